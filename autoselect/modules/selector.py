"""AutoSelector: the trainable part of AutoSelect, attached to a frozen VLM (DESIGN.md 1).

It holds the Scorer, the Denoiser (training only), the token budget and the running per-channel
statistics of the visual tokens that the noise gate uses. Training path (`gate`):

    s = Scorer(V);  alpha = soft_topk(s, k, T);  z = noise_gate(V, alpha, mean, std);  Vhat = Denoiser(z, alpha)

(or another throttler and Denoiser: the options of DESIGN.md 1.7). Inference path (`select`): Scorer
+ hard top-K + gather (`Scorer.select`). Saved as a folder
with `config.json` and `model.safetensors` (no pickle); loading checks that the weights match the
config and says what differs.
"""

import copy
import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import __version__
from ..ops._dispatch import check_values
from ..ops.noise_gate import noise_gate
from ..ops.select import select_topk
from ..ops.soft_topk import KINDS as SOFT_TOPK_KINDS
from ..ops.soft_topk import soft_topk
from .scorer import Scorer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "autoselect.AutoSelector"

# The defaults are the configuration the ablation chose (README, "Ablation"; benchmarks/results/
# ablation-testbed-v1): the PAPER's method throughout. The Transformer Scorer (2 blocks, width 1024,
# 16 heads: scale width and heads with a smaller vision tower), LapSum, unit noise statistics and the
# identity-mask Denoiser block (no memory slots) each beat or tied our first release's choice.
DEFAULT_DENOISER = {"heads": 8, "head_dim": 64, "memory_slots": 0, "mlp_ratio": 2}
DEFAULT_SCORER = {"layers": 2, "width": 1024, "heads": 16, "mlp_ratio": 4}
THROTTLERS = ("noise", "scale", "gumbel")
DENOISERS = ("diagonal", "global", "none")
NOISE_STATS = ("running", "unit")
# Where the selector reads the VLM's visual tokens (DESIGN.md 1, 5): "projector_input" (the selected
# vision layer's features as the projector receives them: LLaVA-1.5 / LLaVA-NeXT, the PAPER's "Pre")
# or "projector_output" (the projector's output: Qwen2-VL / 2.5-VL's merger output, and the first
# release's LLaVA selectors). A config without one (the first release) is "projector_output".
PLACEMENTS = ("projector_input", "projector_output")
# What a config written before an option existed meant: the first release's behaviour. from_pretrained
# fills these in for the keys a file lacks, whatever the constructor's defaults have become since.
FIRST_RELEASE = {"scorer": {"layers": 0, "hidden": 256}, "throttler": "noise", "noise_stats": "running",
                 "soft_topk": "logistic", "placement": "projector_output"}


def _denoiser_config(denoiser) -> dict:
    """The Denoiser as a dict with its "kind": from a kind string, a dict (with or without "kind":
    a dict without one is the first release's diagonal Denoiser arguments) or None ("none")."""
    if denoiser is None or denoiser == "none":
        return {"kind": "none"}
    if denoiser == "default":  # the first release's spelling
        denoiser = "diagonal"
    if isinstance(denoiser, str):
        if denoiser not in DENOISERS:
            raise ValueError(f"AutoSelector: denoiser must be one of {', '.join(DENOISERS)} or a dict, got {denoiser!r}")
        denoiser = {"kind": denoiser}
    if not isinstance(denoiser, dict):
        raise TypeError(f"AutoSelector: denoiser must be a kind ({', '.join(DENOISERS)}), a dict of Denoiser "
                        f"arguments or None, got {type(denoiser).__name__}")
    config = dict(denoiser)
    kind = config.pop("kind", "diagonal")
    if kind not in DENOISERS:
        raise ValueError(f"AutoSelector: denoiser kind must be one of {', '.join(DENOISERS)}, got {kind!r}")
    if kind == "none":
        return {"kind": "none"}
    defaults = dict(DEFAULT_DENOISER, memory_slots=0) if kind == "global" else dict(DEFAULT_DENOISER)
    config.pop("attention", None)
    return {"kind": kind, **defaults, **config}


def _build_denoiser(dim: int, config: dict):
    if config["kind"] == "none":
        return None
    from .denoiser import Denoiser  # the Denoiser module (DESIGN.md 1.4)
    arguments = {key: value for key, value in config.items() if key != "kind"}
    return Denoiser(dim, attention="global" if config["kind"] == "global" else "diagonal", **arguments)


def _choice(name: str, value, choices):
    if value not in choices:
        raise ValueError(f"AutoSelector: {name} must be one of {', '.join(choices)}, got {value!r}")
    return value


class AutoSelector(nn.Module):
    """Scorer + Denoiser + budget gate + throttler + running token statistics (DESIGN.md 1, 4).

    Args (keyword-only after dim):
        dim: token width D of the features the Scorer reads.
        scorer: arguments of `autoselect.Scorer` (default {"layers": 2, "width": 1024, "heads": 16,
            "mlp_ratio": 4}: the PAPER's Transformer Scorer, chosen by the ablation; {"layers": 0,
            "hidden": 256} is the first release's per-token MLP).
        denoiser: "diagonal" (default: no information between tokens; default memory_slots=0, the
            PAPER identity-mask block; memory slots are OURS), "global" (full self-attention: the leaking ablation),
            "none", or a dict of Denoiser arguments with a "kind" key.
        throttler: how the training path dims a token by its keep fraction alpha: "noise" (default,
            the variance-preserving noise gate), "scale" (z = alpha x) or "gumbel" (hard top-K of
            scores + Gumbel noise forward, straight-through soft top-K backward).
        noise_stats: the noise gate's mean and std: "unit" (default, PAPER: mean 0, std 1) or
            "running" (OURS: the tokens' running per-channel statistics; the first release's).
        soft_topk: the budget gate's kind, "laplace" (default, PAPER's LapSum) or "logistic" (OURS,
            the first release's).
        keep: the default budget of `select` and `gate`: an int (tokens per image) or a float in
            (0, 1] (fraction).
        placement: where in the VLM the selector reads the tokens: "projector_output" (default, and
            what a config without one means: the first release) or "projector_input" (before the
            projector; `autoselect.apply` refuses a selector placed where the model has no such point,
            or whose dim differs from the features there).
        keep_range: (low, high) when the selector was trained for every budget in that range
            (`autoselect train --keep low:high`); recorded in the config, keep is then `high`.
        scorer_hidden, eps: the first release's spelling of scorer={"layers": 0, "hidden": ...,
            "eps": ...} (old configs load through them).

    Buffers: `token_mean`, `token_std` (D,) (the noise gate's statistics, updated by
    `update_statistics`) and `token_count` (how many tokens they summarise).
    """

    def __init__(self, dim: int, *, scorer: Optional[dict] = None, denoiser="diagonal", throttler: str = "noise",
                 noise_stats: str = "unit", soft_topk: str = "laplace", keep: Union[int, float] = 64,
                 placement: str = "projector_output", keep_range: Optional[Sequence[int]] = None,
                 scorer_hidden: Optional[int] = None, eps: Optional[float] = None):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"AutoSelector: dim must be a positive int, got {dim!r}")
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not keep > 0 or \
                (isinstance(keep, float) and keep > 1):
            raise ValueError(f"AutoSelector: keep must be an int >= 1 or a float in (0, 1], got {keep!r}")
        if keep_range is not None:
            if not isinstance(keep_range, (list, tuple)) or len(keep_range) != 2 or \
                    any(isinstance(v, bool) or not isinstance(v, int) for v in keep_range) or \
                    not 1 <= keep_range[0] <= keep_range[1]:
                raise ValueError(f"AutoSelector: keep_range must be two ints 1 <= low <= high, got {keep_range!r}")
            keep_range = [int(keep_range[0]), int(keep_range[1])]
        if scorer is not None and (scorer_hidden is not None or eps is not None):
            raise ValueError("AutoSelector: give scorer={...} or the first release's scorer_hidden/eps, not both")
        if scorer is None:  # scorer_hidden / eps spell the first release's MLP scorer
            legacy = scorer_hidden is not None or eps is not None
            scorer = dict(FIRST_RELEASE["scorer"] if legacy else DEFAULT_SCORER)
            if scorer_hidden is not None:
                scorer["hidden"] = scorer_hidden
            if eps is not None:
                scorer["eps"] = eps
        if not isinstance(scorer, dict):
            raise TypeError(f"AutoSelector: scorer must be a dict of Scorer arguments, got {type(scorer).__name__}")
        self.dim = dim
        self.scorer = Scorer(dim, **scorer)
        # The last bias shifts every score of an image alike: neither soft_topk nor the hard top-K
        # sees it, so its gradient is zero up to rounding, which Adam would turn into full-size steps.
        self.scorer.output_bias.requires_grad_(False)
        denoiser = _denoiser_config(denoiser)
        self.denoiser = _build_denoiser(dim, denoiser)
        self.config = {"dim": dim, "scorer": self.scorer.config, "denoiser": denoiser,
                       "throttler": _choice("throttler", throttler, THROTTLERS),
                       "noise_stats": _choice("noise_stats", noise_stats, NOISE_STATS),
                       "soft_topk": _choice("soft_topk", soft_topk, SOFT_TOPK_KINDS), "keep": keep,
                       "placement": _choice("placement", placement, PLACEMENTS)}
        if keep_range is not None:
            self.config["keep_range"] = keep_range
        self.register_buffer("token_mean", torch.zeros(dim))
        self.register_buffer("token_std", torch.ones(dim))
        self.register_buffer("token_count", torch.zeros((), dtype=torch.float64))

    # -- statistics -----------------------------------------------------------------------------

    @torch.no_grad()
    def update_statistics(self, x: Union[Tensor, Sequence[Tensor]]):
        """Fold the tokens x ((B, N, D), (T, D) or a list of (N_i, D)) into the running per-channel
        mean and std (exact pooled statistics over every token seen, merged in float64)."""
        if isinstance(x, (list, tuple)):
            x = torch.cat([t.reshape(-1, self.dim) for t in x])
        if not isinstance(x, Tensor) or x.shape[-1] != self.dim:
            raise ValueError(f"AutoSelector.update_statistics: expected tokens (..., {self.dim}), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        flat = x.detach().reshape(-1, self.dim).to(torch.float64)
        n = flat.shape[0]
        if n == 0:
            return
        var_b, mean_b = torch.var_mean(flat, dim=0, correction=0)
        n_a = float(self.token_count)
        mean_a = self.token_mean.to(torch.float64)
        var_a = self.token_std.to(torch.float64).square() if n_a > 0 else torch.zeros_like(var_b)
        total = n_a + n
        delta = mean_b - mean_a
        mean = mean_a + delta * (n / total)
        var = (var_a * n_a + var_b * n + delta.square() * (n_a * n / total)) / total
        self.token_mean.copy_(mean)
        self.token_std.copy_(var.clamp_min(0).sqrt())
        self.token_count.fill_(total)

    # -- training path --------------------------------------------------------------------------

    def gate(self, x: Tensor, *, temperature: float, k=None, seed: int, offset: int = 0):
        """The training forward: Scorer -> soft top-K (budget k, temperature T) -> throttler ->
        Denoiser. x (B, N, D), the features where the Scorer reads them; returns (vhat (B, N, D) in x's
        dtype, alpha (B, N) float32, scores (B, N)). The noise (throttler "noise") is drawn from
        (seed, offset) and consumes `autoselect.noise_offsets(x.numel())` counters; the Gumbel noise
        (throttler "gumbel") comes from a generator seeded with (seed, offset)."""
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"AutoSelector.gate: expected tokens (B, N, {self.dim}), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        budget = self.config["keep"] if k is None else k
        kind, throttler = self.config["soft_topk"], self.config["throttler"]
        scores = self.scorer(x)
        if throttler == "gumbel":
            z, alpha = self._gumbel_gate(x, scores, budget, temperature, seed, offset)
        else:
            alpha = soft_topk(scores, budget, temperature, kind=kind)
            if throttler == "scale":
                z = x * alpha.unsqueeze(-1).to(x.dtype)
            else:
                z = noise_gate(x, alpha, *self.noise_statistics(), seed=seed, offset=offset)
        vhat = self.denoiser(z, alpha) if self.denoiser is not None else z
        return vhat, alpha, scores

    def noise_statistics(self):
        """The noise gate's (mean, std): the running token statistics, or (0, 1) for noise_stats="unit"."""
        if self.config["noise_stats"] == "unit":
            return torch.zeros_like(self.token_mean), torch.ones_like(self.token_std)
        check_values((self.token_count > 0).all(), "AutoSelector.gate: the token statistics are empty; call "
                     "update_statistics on visual tokens first (the noise gate draws noise with their mean and std)")
        return self.token_mean.detach(), self.token_std.detach()

    def _gumbel_gate(self, x, scores, budget, temperature, seed, offset):
        # Hard top-K of s + Gumbel noise in the forward; the soft top-K's gradient in the backward.
        generator = torch.Generator(device=x.device).manual_seed((seed * 1_000_003 + offset) % (1 << 63))
        uniform = torch.rand(scores.shape, generator=generator, device=x.device, dtype=torch.float32)
        perturbed = scores.float() - torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
        soft = soft_topk(perturbed, budget, temperature, kind=self.config["soft_topk"])
        _, index = select_topk(x.detach(), perturbed.detach(), budget)
        hard = torch.zeros_like(soft).scatter_(1, index, 1.0)
        alpha = hard + (soft - soft.detach())  # exactly hard in value, the soft gradient
        return x * alpha.unsqueeze(-1).to(x.dtype), alpha

    # -- inference path -------------------------------------------------------------------------

    def select(self, x: Union[Tensor, Sequence[Tensor]], k=None, *, return_scores: bool = False):
        """Keep the top-k tokens of each image (Scorer + top-K + gather, fused). x (B, N, D) or a
        ragged list of (N_i, D); k defaults to the configured `keep`. Returns (kept, index) as
        `autoselect.select_topk` does (plus the scores with return_scores)."""
        return self.scorer.select(x, self.config["keep"] if k is None else k, return_scores=return_scores)

    # -- saving and loading ---------------------------------------------------------------------

    def save_pretrained(self, path: Union[str, os.PathLike]):
        """Write `config.json` and `model.safetensors` (parameters and buffers) into folder `path`."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {"format": FORMAT, "autoselect_version": __version__, **self.config}
        (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt", "autoselect": FORMAT})

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], *, device=None, dtype=None) -> "AutoSelector":
        """Load a folder written by `save_pretrained` (a local path: nothing is downloaded).

        Raises FileNotFoundError when a file is missing and ValueError when the config is not an
        AutoSelector's or the weights do not match it (naming the missing, unexpected and
        mis-shaped tensors)."""
        from safetensors.torch import load_file

        path = Path(path)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (path / name).is_file():
                raise FileNotFoundError(f"AutoSelector.from_pretrained: {path / name} does not exist (expected a "
                                        f"folder written by save_pretrained)")
        config = json.loads((path / CONFIG_NAME).read_text())
        if config.pop("format", None) != FORMAT:
            raise ValueError(f"AutoSelector.from_pretrained: {path / CONFIG_NAME} is not an AutoSelector config")
        config.pop("autoselect_version", None)
        for key, value in FIRST_RELEASE.items():
            if key not in config and not (key == "scorer" and ("scorer_hidden" in config or "eps" in config)):
                config[key] = copy.deepcopy(value)
        try:
            dim = config.pop("dim")
            model = cls(dim, **config)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"AutoSelector.from_pretrained: {path / CONFIG_NAME} does not describe an "
                             f"AutoSelector ({exc})") from exc
        tensors = load_file(str(path / WEIGHTS_NAME))
        expected = model.state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        mis_shaped = [f"{n}: config gives {tuple(expected[n].shape)}, file holds {tuple(tensors[n].shape)}"
                      for n in sorted(set(expected) & set(tensors)) if expected[n].shape != tensors[n].shape]
        if missing or unexpected or mis_shaped:
            problems = []
            if missing:
                problems.append(f"missing from the weights: {', '.join(missing)}")
            if unexpected:
                problems.append(f"not in the model the config describes: {', '.join(unexpected)}")
            if mis_shaped:
                problems.append("shapes differ: " + "; ".join(mis_shaped))
            raise ValueError(f"AutoSelector.from_pretrained: {path} holds weights that do not match its config "
                             f"({json.dumps({'dim': dim, **config})}): " + " | ".join(problems))
        model.load_state_dict(tensors)
        if device is not None or dtype is not None:
            model.to(device=device, dtype=dtype)
        return model

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, placement={self.config['placement']}, keep={self.config['keep']}, "
                f"tokens seen={int(self.token_count)}")
