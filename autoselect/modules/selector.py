"""AutoSelector: the trainable part of AutoSelect, attached to a frozen VLM (DESIGN.md 1).

It holds the Scorer, the Denoiser (training only), the token budget and the running per-channel
statistics of the visual tokens that the noise gate uses. Training path (`gate`):

    s = Scorer(V);  alpha = soft_topk(s, k, T);  z = noise_gate(V, alpha, mean, std);  Vhat = Denoiser(z, alpha)

Inference path (`select`): Scorer + hard top-K + gather, fused (`score_select`). Saved as a folder
with `config.json` and `model.safetensors` (no pickle); loading checks that the weights match the
config and says what differs.
"""

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import __version__
from ..ops.noise_gate import noise_gate
from ..ops.soft_topk import soft_topk
from .scorer import Scorer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "autoselect.AutoSelector"

DEFAULT_DENOISER = {"heads": 8, "head_dim": 64, "memory_slots": 64, "mlp_ratio": 2}


def _build_denoiser(dim: int, config: Optional[dict]):
    if config is None:
        return None
    from .denoiser import Denoiser  # the Denoiser module (DESIGN.md 1.4)
    return Denoiser(dim, **config)


class AutoSelector(nn.Module):
    """Scorer + Denoiser + budget gate + running token statistics.

    Args:
        dim: token width D (the projector's output width, i.e. the language model's hidden size).
        scorer_hidden: hidden width of the Scorer (default 256).
        denoiser: keyword arguments of `autoselect.Denoiser` (default heads=8, head_dim=64,
            memory_slots=64, mlp_ratio=2), or None to train without one (z goes to the language
            model directly).
        keep: the default budget of `select` and `gate`: an int (tokens per image) or a float in
            (0, 1] (fraction).
        eps: LayerNorm epsilon of the Scorer.

    Buffers: `token_mean`, `token_std` (D,) (the noise gate's statistics, updated by
    `update_statistics`) and `token_count` (how many tokens they summarise).
    """

    def __init__(self, dim: int, *, scorer_hidden: int = 256, denoiser: Optional[dict] = "default",
                 keep: Union[int, float] = 64, eps: float = 1e-5):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"AutoSelector: dim must be a positive int, got {dim!r}")
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not keep > 0 or \
                (isinstance(keep, float) and keep > 1):
            raise ValueError(f"AutoSelector: keep must be an int >= 1 or a float in (0, 1], got {keep!r}")
        if isinstance(denoiser, str) and denoiser == "default":
            denoiser = dict(DEFAULT_DENOISER)
        if denoiser is not None and not isinstance(denoiser, dict):
            raise TypeError(f"AutoSelector: denoiser must be a dict of Denoiser arguments or None, got "
                            f"{type(denoiser).__name__}")
        self.dim = dim
        self.config = {"dim": dim, "scorer_hidden": scorer_hidden, "denoiser": denoiser, "keep": keep, "eps": eps}
        self.scorer = Scorer(dim, scorer_hidden, eps=eps)
        # The last bias shifts every score of an image alike: neither soft_topk nor the hard top-K
        # sees it, so its gradient is zero up to rounding, which Adam would turn into full-size steps.
        self.scorer.fc2.bias.requires_grad_(False)
        self.denoiser = _build_denoiser(dim, denoiser)
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
        """The training forward: Scorer -> soft top-K (budget k, temperature T) -> noise gate ->
        Denoiser. x (B, N, D) from the frozen projector; returns (vhat (B, N, D) in x's dtype,
        alpha (B, N) float32, scores (B, N)). The noise is drawn from (seed, offset) and consumes
        `autoselect.noise_offsets(x.numel())` counters."""
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"AutoSelector.gate: expected tokens (B, N, {self.dim}), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if float(self.token_count) == 0:
            raise RuntimeError("AutoSelector.gate: the token statistics are empty; call update_statistics on "
                               "visual tokens first (the noise gate draws noise with their mean and std)")
        scores = self.scorer(x)
        alpha = soft_topk(scores, self.config["keep"] if k is None else k, temperature)
        z = noise_gate(x, alpha, self.token_mean.detach(), self.token_std.detach(), seed=seed, offset=offset)
        vhat = self.denoiser(z, alpha) if self.denoiser is not None else z
        return vhat, alpha, scores

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
        return f"dim={self.dim}, keep={self.config['keep']}, tokens seen={int(self.token_count)}"
