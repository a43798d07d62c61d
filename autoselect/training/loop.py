"""The training loop both trainers share: `Trainer` (setup / step / evaluate / save).

`autoselect train` (training.trainer, the AutoSelector on a frozen VLM) and the testbed's VLM training
(testbed.train_vlm, both stages) build one `Trainer` over their parameter groups and call it once per
step; what differs between them (the data, the forward pass, the metric, what a checkpoint holds) stays
with the caller. A Trainer owns:

- the optimizer: AdamW over the given groups (`weight_decay`, `betas`);
- the learning rate: before each optimizer step, every group's lr is `schedule(step, base_lr)`, the
  group's base lr its lr at construction (`learning_rate_at`: warm-up, then cosine decay over the rest;
  `warmup_cosine`: warm-up times a cosine decay over every step, the testbed VLM's);
- clipping (gradient norm `clip`), the optimizer step and zeroing the gradients;
- a running loss (`smoothing`: an exponential average, or the last value);
- evaluation bookkeeping: the best metric and its step (`maximize` or not), evaluations without
  improvement and early stopping after `patience` of them;
- the log (one JSON line per entry) and the progress bar (tqdm);
- checkpoints: `save` writes the given models' `save_pretrained` output and, on request, the optimizer
  state (optimizer.safetensors) and trainer_state.json (the caller's state, the bookkeeping, the
  optimizer's param_groups); `restore` reads them back, so a resumed run takes the same steps.
"""

import json
import math
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch


def learning_rate_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def warmup_cosine(warmup: int, steps: int) -> Callable[[int], float]:
    """The factor of the lr at `step` (0-based): linear warm-up over `warmup` steps, times a cosine
    decay to 0 at `steps` (the testbed VLM's schedule; `Trainer` multiplies it into the base lr)."""
    return lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(1, steps)))


def scaled(factor: Callable[[int], float]) -> Callable[[int, float], float]:
    """A `Trainer` schedule from a factor of the step: lr = base_lr * factor(step) (as torch's LambdaLR)."""
    return lambda step, base: base * factor(step)


def save_optimizer(folder: Path, optimizer, state: dict):
    """The optimizer state as safetensors (optimizer.safetensors) and `state` with the optimizer's
    param_groups as trainer_state.json, in `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    optimizer_state = optimizer.state_dict()
    tensors = {}
    for index, entry in optimizer_state["state"].items():
        for name, value in entry.items():
            tensors[f"state.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "trainer_state.json").write_text(json.dumps({**state, "param_groups": optimizer_state["param_groups"]},
                                                          indent=1) + "\n")


def restore_optimizer(folder: Path, optimizer, state: dict):
    """Load the optimizer state written by `save_optimizer` (param_groups from `state`) into `optimizer`."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(folder) / "optimizer.safetensors"))
    per_param = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})


class Trainer:
    """One optimizer, its schedule and the bookkeeping around it (see the module docstring).

    Args:
        groups: parameters, or param groups (dicts with "params" and optionally "lr").
        steps: optimizer steps of the run; `range(start, steps)` is what iterating the Trainer yields.
        lr: the base lr of groups without their own.
        schedule: (step, base_lr) -> the lr of that step (0-based); e.g. `scaled(warmup_cosine(w, n))` or
            `lambda s, base: learning_rate_at(s, n, base, w)`.
        clip: gradient-norm clip (over `clip_parameters`, default the groups' parameters in order).
        weight_decay, betas: AdamW's.
        smoothing: the running loss is `smoothing * running + (1 - smoothing) * loss` (the weight rounded
            to 12 decimals, so 0.98 gives 0.02 exactly); None: the last loss.
        maximize: whether a larger metric is better in `evaluate`.
        patience: `evaluate` asks to stop after this many evaluations without improvement (0: never).
        zero_grad_after: `step` sets the gradients to None after the update; False leaves them (the caller
            zeroes them before its backward, and the last step's gradients stay readable).
        log: path of the JSON-lines log (None: no log); append: add to it instead of starting it anew.
        start: the first step (a resumed run's); progress: show a tqdm bar; progress_options: tqdm's.
    """

    def __init__(self, groups: Iterable, *, steps: int, lr: float, schedule: Callable[[int, float], float],
                 clip: float = 1.0, weight_decay: float = 0.01, betas: Sequence[float] = (0.9, 0.999),
                 clip_parameters: Optional[Iterable] = None, smoothing: Optional[float] = None,
                 maximize: bool = False, patience: int = 0, zero_grad_after: bool = True, log: Optional[str] = None,
                 append: bool = False, start: int = 0, progress: bool = True, progress_options: Optional[dict] = None):
        self.optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.clip_parameters = list(clip_parameters) if clip_parameters is not None else self.parameters
        self.steps, self.start, self.schedule, self.clip = steps, start, schedule, clip
        self.smoothing, self.zero_grad_after = smoothing, zero_grad_after
        self.running = None
        self.maximize, self.patience = maximize, patience
        self.best = self.best_step = None
        self.bad_evaluations = 0
        self.log_path = Path(log) if log is not None else None
        if self.log_path is not None and not append:
            self.log_path.write_text("")
        self.progress, self.progress_options = progress, dict(progress_options or {})
        self.bar = None

    # -- the loop ----------------------------------------------------------------------------------

    def __iter__(self):
        """The steps start..steps-1 (0-based), through a tqdm bar when `progress`."""
        from tqdm.auto import tqdm

        options = {"dynamic_ncols": True, "initial": self.start, "total": self.steps, **self.progress_options}
        self.bar = tqdm(range(self.start, self.steps), disable=not self.progress, **options)
        return iter(self.bar)

    @property
    def lr(self) -> float:
        """The first group's current lr (the last step's, once a step ran)."""
        return self.optimizer.param_groups[0]["lr"]

    def set_learning_rate(self, step: int):
        """Every group's lr for `step` (0-based): schedule(step, its base lr)."""
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = self.schedule(step, base)

    def step(self, step: int, loss: Optional[float] = None) -> torch.Tensor:
        """One optimizer step after the caller's backward: the lr of `step`, the gradient-norm clip,
        AdamW's update, the gradients set to None (unless zero_grad_after is off); `loss` (a float)
        updates the running loss. Returns the gradient norm before clipping."""
        self.set_learning_rate(step)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.clip_parameters, self.clip)
        self.optimizer.step()
        if self.zero_grad_after:
            self.optimizer.zero_grad(set_to_none=True)
        if loss is not None:
            self.track(loss)
        return grad_norm

    def track(self, loss: float) -> float:
        """Add `loss` to the running loss; returns it."""
        if self.running is None or self.smoothing is None:
            self.running = loss
        else:
            self.running = self.smoothing * self.running + round(1 - self.smoothing, 12) * loss
        return self.running

    # -- evaluation and early stopping ---------------------------------------------------------------

    def evaluate(self, step: int, metric, *, can_stop: bool = True) -> dict:
        """Record an evaluation after `step` steps: `metric` is a number or a callable giving one. Tracks
        the best value and its step and counts evaluations without improvement. Returns {"value",
        "improved", "best", "best_step", "stop"}; stop is true when `patience` evaluations in a row did not
        improve and `can_stop` (e.g. not after the last step)."""
        value = metric() if callable(metric) else metric
        improved = self.best is None or (value > self.best if self.maximize else value < self.best)
        if improved:
            self.best, self.best_step, self.bad_evaluations = value, step, 0
        else:
            self.bad_evaluations += 1
        stop = bool(self.patience) and self.bad_evaluations >= self.patience and can_stop
        return {"value": value, "improved": improved, "best": self.best, "best_step": self.best_step, "stop": stop}

    def state(self) -> dict:
        """The evaluation bookkeeping, for trainer_state.json: best, best_step, bad_evaluations."""
        return {"best": self.best, "best_step": self.best_step, "bad_evaluations": self.bad_evaluations}

    def load_state(self, state: dict):
        """Restore the bookkeeping of `state()` (missing keys: as at the start)."""
        self.best, self.best_step = state.get("best"), state.get("best_step")
        self.bad_evaluations = int(state.get("bad_evaluations") or 0)

    # -- log and checkpoints -----------------------------------------------------------------------

    def log(self, entry: dict):
        """Append `entry` as one JSON line to the log (nothing without a log)."""
        if self.log_path is not None:
            with open(self.log_path, "a") as handle:
                handle.write(json.dumps(entry) + "\n")

    def write(self, message: str):
        """A line on the terminal that keeps the progress bar intact."""
        from tqdm.auto import tqdm

        (self.bar or tqdm).write(message)

    def save(self, folder, *models, state: Optional[dict] = None):
        """Each of `models`' save_pretrained(folder); with `state` (a dict) also the optimizer state
        (optimizer.safetensors) and trainer_state.json holding `state` and the optimizer's param_groups."""
        folder = Path(folder)
        for model in models:
            model.save_pretrained(folder)
        if state is not None:
            save_optimizer(folder, self.optimizer, state)

    def restore(self, folder) -> dict:
        """Read a checkpoint written by `save(..., state=...)`: loads the optimizer state and returns the
        saved state (param_groups included)."""
        state = json.loads((Path(folder) / "trainer_state.json").read_text())
        restore_optimizer(folder, self.optimizer, state)
        return state
