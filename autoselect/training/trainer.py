"""`autoselect train`: train an AutoSelector on a frozen Hugging Face VLM with only its next-token loss.

    autoselect train --model PATH --data train.json --images DIR --out OUT --keep 64 [--steps ...]

Per step (DESIGN.md 1.5): the frozen vision tower gives the visual tokens V at the selector's
placement (no gradient): `projector_input` (LLaVA's default: the selected vision layer's features,
CLS dropped, as the projector receives them) or `projector_output` (the projector's output;
--placement picks it). The AutoSelector runs Scorer -> soft top-K (temperature annealed from
--temperature START:END, --temperature-schedule geometric or cosine) -> throttler -> Denoiser; at
projector_input the frozen projector then maps Vhat to language-model tokens (the gradient flows
through it into the selector); the frozen language model reads them in place of its own (through
transformers' `mm_encoder_outputs`, no patching), and its next-token loss on the answer tokens is the
only objective. Only the AutoSelector's parameters are trained (AdamW, linear warm-up then cosine
learning rate, gradient accumulation, clipping); the VLM stays in eval mode with requires_grad off.
Every AutoSelector option is a flag (--scorer-*, --denoiser*, --memory-slots, --throttler,
--noise-stats, --soft-topk) and lands in the saved selector's config.

Budgets: `--keep 64` trains at K = 64; `--keep 16:192` draws K per step uniformly from the integers
16..192 (a function of --seed and the step: the same on every process, and after a resume), logged
with each step; the selector's config then holds keep = 192 and keep_range = [16, 192].

Early stopping (--val VAL.json): every --val-every steps the training loss of the selector (the
gate at the schedule's final temperature, fixed noise; at the range's two ends averaged for a keep
range) is measured on the validation conversations; OUT/best/ holds the best selector so far, the run
stops after --patience evaluations without improvement (0: never), and OUT/selector/ is the best one.

Deterministic from --seed: the data order (a permutation per epoch), the noise (counter-based:
micro-step m of rank r draws at offset (m * world + r) * ceil(numel / 4)) and the initialisation, so
a resumed run takes the same steps as an uninterrupted one, and W processes on B images each take
the same steps as one process on W * B (the loss is a sum over answer tokens divided by the global
count, the gradients are summed over processes). Several processes: `torchrun --nproc-per-node N
-m autoselect train ...` (gloo on the CPU, nccl on GPUs).

The loop is `training.loop.Trainer`'s (shared with the testbed's VLM training): `_setup` builds the
VLM, the data, the selector and the Trainer, `_train_step` runs one step, `_evaluate` one validation,
`_finish` writes the last checkpoint and the selector.

Checkpoints: OUT/checkpoint-<step>/ holds the selector (config.json + model.safetensors), the
optimizer state (optimizer.safetensors) and trainer_state.json; OUT/selector/ the final selector;
OUT/train_log.jsonl one line per logged step.
"""

import argparse
import math
import os
import time
from pathlib import Path
from typing import Optional

import torch

from ..hf import freeze, load_vlm, visual_tokens  # noqa: F401 (freeze: re-exported)
from ..integrations import capture_inputs, get_adapter
from ..modules.selector import PLACEMENTS, AutoSelector
from ..ops.noise_gate import noise_offsets
from .data import IGNORE_INDEX, ConversationCollator, load_records
from .loop import Trainer, learning_rate_at, restore_optimizer, save_optimizer  # noqa: F401 (re-exported)


# ----------------------------------------------------------------------------------------------------
# The frozen VLM
# ----------------------------------------------------------------------------------------------------

def text_width(model) -> int:
    config = model.config
    return int(getattr(getattr(config, "text_config", config), "hidden_size"))


def training_adapter(model):
    """The family adapter of the frozen VLM, for families the trainer's data path supports (LLaVA-1.5:
    one image per conversation, `<image>` expanded by the processor)."""
    adapter = get_adapter(model)
    if adapter.name != "llava":
        raise ValueError(f"autoselect train: the {adapter.name} family is not supported by the trainer yet (its data "
                         "collator is LLaVA-1.5's); apply() supports it with a selector trained elsewhere")
    return adapter


@torch.no_grad()
def placement_tokens(model, pixel_values, placement: str) -> torch.Tensor:
    """The visual tokens (B, N, D) at `placement`, no gradient: the projector's input
    ("projector_input": the selected vision layer's features, CLS dropped for "default") or its
    output ("projector_output")."""
    if placement == "projector_output":
        return visual_tokens(model, pixel_values)
    adapter = get_adapter(model)
    core = adapter.core(model)
    with capture_inputs(adapter.projector(core)) as captured:
        visual_tokens(model, pixel_values)
    return captured[-1][0]


def to_language_model(model, tokens, placement: str):
    """The language-model tokens of `tokens` at `placement`: the frozen projector applied to them at
    "projector_input" (gradients flow through it to `tokens`), unchanged at "projector_output"."""
    if placement == "projector_output":
        return tokens
    adapter = get_adapter(model)
    projector = adapter.projector(adapter.core(model))
    return projector(tokens.to(model.dtype))


def parse_keep(text) -> tuple:
    """`--keep`: "64" -> (64, 64); "16:192" -> (16, 192). ValueError for anything else."""
    try:
        parts = [int(v) for v in str(text).split(":")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or not 1 <= parts[0] <= parts[-1]:
        raise ValueError(f"--keep takes K (an int >= 1) or LOW:HIGH (1 <= LOW <= HIGH), got {text!r}")
    return parts[0], parts[-1]


def budget_at(step: int, keep: tuple, seed: int) -> int:
    """The budget of `step`: K for a fixed keep, else uniform in LOW..HIGH from a generator seeded by
    (seed, step): the same on every process of a run and after a resume."""
    low, high = keep
    if low == high:
        return low
    generator = torch.Generator().manual_seed((seed * 1_000_003 + 7_919 * (step + 1) + 17) % (1 << 63))
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def parse_temperature(text) -> tuple:
    """`--temperature START:END` -> (start, end), both > 0."""
    try:
        start, end = (float(v) for v in str(text).split(":"))
    except ValueError:
        raise ValueError(f"--temperature takes START:END (e.g. 2.0:0.1), got {text!r}") from None
    if not (start > 0 and end > 0):
        raise ValueError(f"--temperature: both ends must be > 0, got {text!r}")
    return start, end


def forward_with_tokens(model, batch, tokens):
    """The VLM's logits with `tokens` (B, N, D) in place of its own visual tokens."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    image = BaseModelOutputWithPooling(pooler_output=list(tokens.to(model.dtype)))
    return model(input_ids=batch["input_ids"].to(model.device), attention_mask=batch["attention_mask"].to(model.device),
                 mm_encoder_outputs={"image": image}).logits


def answer_loss_sum(logits, labels):
    """Sum of the next-token cross-entropy over the answer tokens (labels != IGNORE_INDEX)."""
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:].to(logits.device)
    return torch.nn.functional.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")


# ----------------------------------------------------------------------------------------------------
# Schedules, distributed helpers, checkpoints
# ----------------------------------------------------------------------------------------------------

TEMPERATURE_SCHEDULES = ("geometric", "cosine")
# the diagonal Denoiser without memory slots: the PAPER identity-mask block (the ablation: 64 slots tie it)
DEFAULT_MEMORY_SLOTS = 0


def temperature_at(step: int, steps: int, start: float, end: float, schedule: str = "geometric") -> float:
    """The soft top-K temperature of `step` (0-based), from `start` (step 0) to `end` (the last step):
    "geometric" (start * (end / start) ** t) or "cosine" (end + (start - end) (1 + cos(pi t)) / 2, the
    PAPER's, 2.0 -> 0.1), t = step / (steps - 1)."""
    if schedule not in TEMPERATURE_SCHEDULES:
        raise ValueError(f"temperature schedule must be one of {', '.join(TEMPERATURE_SCHEDULES)}, got {schedule!r}")
    if steps <= 1:
        return end
    t = min(step, steps - 1) / (steps - 1)
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))
    return start * (end / start) ** t


class Distributed:
    """Rank and world size from torchrun's environment; a no-op with one process."""

    def __init__(self, device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.active = self.world > 1
        if self.active and not torch.distributed.is_initialized():
            backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)

    def sum_(self, tensor):
        if self.active:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def barrier(self):
        if self.active:
            torch.distributed.barrier()

    def close(self):
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def save_checkpoint(folder: Path, selector, optimizer, state: dict):
    """Selector (safetensors + config), optimizer state (safetensors) and trainer state (JSON)."""
    selector.save_pretrained(folder)
    save_optimizer(folder, optimizer, state)


def latest_checkpoint(out: Path) -> Optional[Path]:
    found = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit()
                   else -1)
    return found[-1] if found else None


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------

def batch_indices(step: int, micro: int, accumulation: int, batch_size: int, world: int, rank: int, count: int,
                  seed: int):
    """The record indices of (step, micro-batch) on `rank`: global batches of world * batch_size
    consecutive entries of a per-epoch permutation (seeded), incomplete batches dropped."""
    global_batch = world * batch_size
    per_epoch = count // global_batch
    if per_epoch == 0:
        raise ValueError(f"{count} records are fewer than one global batch ({world} x {batch_size})")
    slot = step * accumulation + micro
    epoch, position = divmod(slot, per_epoch)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    start = position * global_batch + rank * batch_size
    return order[start:start + batch_size].tolist()


def selector_options(args, dim: int, placement: str, keep: tuple) -> dict:
    """The AutoSelector's constructor arguments from the parsed flags (every option is a flag)."""
    if args.scorer_layers == 0:
        scorer = {"layers": 0, "hidden": args.scorer_hidden}
    else:
        scorer = {"layers": args.scorer_layers, "width": args.scorer_width, "heads": args.scorer_heads,
                  "mlp_ratio": args.scorer_mlp_ratio}
    kind = "none" if args.no_denoiser else args.denoiser
    if kind == "none":
        denoiser = "none"
    else:
        slots = args.memory_slots if args.memory_slots is not None else DEFAULT_MEMORY_SLOTS
        denoiser = {"kind": kind, "heads": args.denoiser_heads, "head_dim": args.denoiser_head_dim,
                    "memory_slots": slots, "mlp_ratio": args.denoiser_mlp_ratio}
    options = dict(scorer=scorer, denoiser=denoiser, throttler=args.throttler, noise_stats=args.noise_stats,
                   soft_topk=args.soft_topk, keep=keep[1], placement=placement)
    if keep[0] != keep[1]:
        options["keep_range"] = list(keep)
    return options


def _temperatures(args) -> tuple:
    if args.temperature is not None:
        return parse_temperature(args.temperature)
    return args.temperature_start, args.temperature_end


def batch_loss_sum(model, selector, batch, placement: str, *, temperature: float, k: int, seed: int, slot: int,
                   base: int = 0):
    """(sum of the answer-token loss of `batch` through the selector's gate, alpha (B, N)). The noise
    is drawn at counter offset base + slot * noise_offsets(numel of the tokens)."""
    tokens = placement_tokens(model, batch["pixel_values"], placement).float()
    offset = base + slot * noise_offsets(tokens.numel())
    vhat, alpha, _ = selector.gate(tokens, temperature=temperature, k=k, seed=seed, offset=offset)
    logits = forward_with_tokens(model, batch, to_language_model(model, vhat, placement))
    return answer_loss_sum(logits, batch["labels"]), alpha


VALIDATION_OFFSET = 1 << 46  # noise counters of the validation batches: far from every training step's


@torch.no_grad()
def validation_loss(model, selector, collator, records, args, placement: str, keep: tuple, temperature: float,
                    dist) -> float:
    """The selector's training loss on the validation records (answer-token mean), at `temperature`
    with fixed noise; for a keep range, the mean over its two ends. Batches are shared out over the
    processes and the sums reduced, so every process gets the same value."""
    budgets = sorted(set(keep))
    totals = torch.zeros(2, dtype=torch.float64)
    starts = list(range(0, len(records), args.batch_size))
    for number, begin in enumerate(starts):
        if number % dist.world != dist.rank:
            continue
        batch = collator(records[begin:begin + args.batch_size])
        for k in budgets:
            loss, _ = batch_loss_sum(model, selector, batch, placement, temperature=temperature, k=k, seed=args.seed,
                                     slot=number, base=VALIDATION_OFFSET)
            totals[0] += float(loss) / len(budgets)
        totals[1] += float((batch["labels"] != IGNORE_INDEX).sum())
    dist.sum_(totals)
    return float(totals[0] / totals[1].clamp_min(1))


def _copy_selector(source: Path, target: Path):
    import shutil

    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(source / name, target / name)


class _Run:
    """What one `train` call holds between its steps (built by `_setup`)."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def trainer_state(self, step_done: int) -> dict:
        """trainer_state.json's fields (besides the optimizer's param_groups)."""
        return {"step": step_done, "seed": self.args.seed, "keep": self.args.keep, **self.early()}

    def early(self) -> dict:
        """The early-stopping bookkeeping under the names of trainer_state.json and the summary."""
        return {"best_val_loss": self.trainer.best, "best_step": self.trainer.best_step,
                "bad_evaluations": self.trainer.bad_evaluations}


def _setup(args) -> _Run:
    """The frozen VLM, the data, the selector (new, with its token statistics, or resumed) and its
    `Trainer` (AdamW, `learning_rate_at`, the log, the progress bar)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dist = Distributed(device)
    if device.type == "cuda" and dist.active:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    keep = parse_keep(args.keep)
    t_start, t_end = _temperatures(args)
    if args.temperature_schedule not in TEMPERATURE_SCHEDULES:
        raise ValueError(f"--temperature-schedule must be one of {', '.join(TEMPERATURE_SCHEDULES)}")
    model, processor = load_vlm(args.model, dtype=dtype, device=device)
    adapter = training_adapter(model)
    frozen_before = {name: p.detach().clone() for name, p in model.named_parameters()} if args.check_frozen else None
    records = load_records(args.data)
    collator = ConversationCollator(processor, args.images or os.path.dirname(os.path.abspath(args.data)),
                                    system=args.system)
    val_records = val_collator = None
    if args.val:
        val_records = load_records(args.val)
        val_collator = ConversationCollator(processor, args.val_images or os.path.dirname(os.path.abspath(args.val)),
                                            system=args.system)
    out = Path(args.out)
    if dist.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    resume = None
    if args.resume:
        resume = latest_checkpoint(out) if args.resume == "latest" else Path(args.resume)
        if resume is None:
            raise FileNotFoundError(f"--resume latest: no checkpoint-* folder in {out}")
    if resume is not None:
        selector = AutoSelector.from_pretrained(resume, device=device)
        placement = selector.config["placement"]
    else:
        placement = args.placement or adapter.placements[0]
        if placement not in adapter.placements:
            raise ValueError(f"--placement {placement}: the {adapter.name} family offers "
                             f"{', '.join(adapter.placements)}")
        selector = _new_selector(args, model, adapter, collator, records, placement, keep, device)
    selector.train()
    start_step = 0
    trainer = Trainer([p for p in selector.parameters() if p.requires_grad], steps=args.steps, lr=args.lr,
                      schedule=lambda step, base: learning_rate_at(step, args.steps, base, args.warmup),
                      clip=args.clip, weight_decay=args.weight_decay, patience=args.patience, zero_grad_after=False,
                      log=out / "train_log.jsonl" if dist.rank == 0 else None, append=True,
                      progress=dist.rank == 0 and args.progress, progress_options={"desc": "autoselect train"})
    if resume is not None:
        state = trainer.restore(resume)
        start_step = trainer.start = int(state["step"])
        trainer.load_state({"best": state.get("best_val_loss"), "best_step": state.get("best_step"),
                            "bad_evaluations": state.get("bad_evaluations", 0)})
    return _Run(args=args, device=device, dist=dist, keep=keep, t_start=t_start, t_end=t_end, model=model,
                frozen_before=frozen_before, records=records, collator=collator, val_records=val_records,
                val_collator=val_collator, out=out, selector=selector, placement=placement, trainer=trainer,
                start_step=start_step, started=time.time(),
                summary={"first_loss": None, "last_loss": None, "steps": args.steps, "placement": placement})


def _new_selector(args, model, adapter, collator, records, placement: str, keep: tuple, device):
    """A freshly initialised AutoSelector (seeded by --seed) with running token statistics of
    --stats-images training images."""
    torch.manual_seed(args.seed)
    dim = adapter.feature_width(adapter.core(model), placement)
    selector = AutoSelector(dim, **selector_options(args, dim, placement, keep)).to(device)
    statistics_indices = torch.randperm(len(records), generator=torch.Generator().manual_seed(args.seed))
    for begin in range(0, min(args.stats_images, len(records)), args.batch_size):
        chunk = [records[i] for i in statistics_indices[begin:min(begin + args.batch_size, args.stats_images)]]
        selector.update_statistics(placement_tokens(model, collator(chunk)["pixel_values"], placement).float())
    return selector


def _sum_gradients(parameters, dist):
    """Missing gradients become zeros; with several processes, the gradients are summed over them (each
    loss is already divided by the global answer-token count)."""
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    if dist.active:
        flat = torch.cat([p.grad.reshape(-1) for p in parameters])
        dist.sum_(flat)
        offset = 0
        for p in parameters:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def _train_step(run: _Run, step: int) -> dict:
    """One optimizer step (--grad-accum micro-batches): the answer-token loss through the selector's
    gate, backward, gradients summed over processes, clipped, AdamW. Returns the step's log entry (with
    "log": whether --log-every asks for it)."""
    args, dist, trainer = run.args, run.dist, run.trainer
    temperature = temperature_at(step, args.steps, run.t_start, run.t_end, args.temperature_schedule)
    budget = budget_at(step, run.keep, args.seed)
    batches = [run.collator([run.records[i] for i in batch_indices(step, micro, args.grad_accum, args.batch_size,
                                                                   dist.world, dist.rank, len(run.records), args.seed)])
               for micro in range(args.grad_accum)]
    answer_tokens = dist.sum_(torch.tensor(float(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches))))
    trainer.optimizer.zero_grad(set_to_none=True)  # before the backward: the last step's gradients stay readable
    loss_total, alpha_sums = torch.zeros((), dtype=torch.float64), []
    for micro, batch in enumerate(batches):
        micro_index = step * args.grad_accum + micro
        loss, alpha = batch_loss_sum(run.model, run.selector, batch, run.placement, temperature=temperature, k=budget,
                                     seed=args.seed, slot=micro_index * dist.world + dist.rank)
        loss = loss / answer_tokens.item()
        loss.backward()
        loss_total += loss.detach().double().cpu()
        alpha_sums.append(alpha.detach().sum(-1))
    _sum_gradients(trainer.parameters, dist)
    grad_norm = trainer.step(step)
    loss_value = trainer.track(float(dist.sum_(loss_total.clone())))
    alpha_sum = torch.cat(alpha_sums)
    run.summary["first_loss"] = loss_value if run.summary["first_loss"] is None else run.summary["first_loss"]
    run.summary["last_loss"] = loss_value
    if trainer.bar is not None:
        trainer.bar.set_postfix(loss=f"{loss_value:.3f}", T=f"{temperature:.3f}", K=budget)
    logged = (step + 1) % args.log_every == 0 or step == run.start_step or step + 1 == args.steps
    return {"log": logged, "step": step + 1, "loss": loss_value, "temperature": temperature, "lr": trainer.lr,
            "grad_norm": float(grad_norm), "alpha_sum_min": float(alpha_sum.min()),
            "alpha_sum_max": float(alpha_sum.max()), "keep": budget, "elapsed_s": round(time.time() - run.started, 2)}


def _evaluate(run: _Run, step: int, entry: dict) -> bool:
    """The validation loss after `step` (0-based) into the Trainer's early-stopping bookkeeping and the
    step's log entry; OUT/best/ on improvement. Returns whether to stop (--patience)."""
    args, trainer = run.args, run.trainer
    val = validation_loss(run.model, run.selector, run.val_collator, run.val_records, args, run.placement, run.keep,
                          run.t_end, run.dist)
    result = trainer.evaluate(step + 1, val, can_stop=step + 1 < args.steps)
    if result["improved"] and run.dist.rank == 0:
        trainer.save(run.out / "best", run.selector, state=run.trainer_state(step + 1))
    if not entry["log"]:  # a step --log-every skips: its number and budget only
        keep = entry["keep"]
        entry.clear()
        entry.update(step=step + 1, keep=keep)
    entry.update(log=True, val_loss=val, best_val_loss=trainer.best, best_step=trainer.best_step)
    if result["stop"]:
        entry["early_stop"] = True
    return result["stop"]


def _finish(run: _Run, last: int, stopped: bool) -> dict:
    """The last checkpoint, OUT/selector/ (the best one with --val), the frozen-weights check; the summary."""
    if run.dist.rank == 0:
        run.trainer.save(run.out / f"checkpoint-{last}", run.selector, state=run.trainer_state(last))
        if run.val_records is not None and (run.out / "best").is_dir():
            _copy_selector(run.out / "best", run.out / "selector")
        else:
            run.selector.save_pretrained(run.out / "selector")
    if run.frozen_before is not None:
        changed = [n for n, p in run.model.named_parameters() if not torch.equal(p, run.frozen_before[n])]
        if changed:
            raise RuntimeError(f"the frozen VLM changed during training: {changed[:5]}")
    run.dist.barrier()
    run.dist.close()
    summary = dict(run.summary, steps_run=last, stopped_early=stopped, **run.early())
    summary["selector"] = run.selector
    return summary


def train(args) -> dict:
    """Run the training described by the parsed arguments (see `build_parser`). Returns a summary
    (first and last loss, steps run, the selector, and with --val the best validation loss and step)."""
    run = _setup(args)
    stopped_at = None
    for step in run.trainer:
        entry = _train_step(run, step)
        stop = False
        if run.val_records is not None and ((step + 1) % args.val_every == 0 or step + 1 == args.steps):
            stop = _evaluate(run, step, entry)
        if run.dist.rank == 0:
            if entry.pop("log"):
                run.trainer.log(entry)
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps and not stop:
                run.trainer.save(run.out / f"checkpoint-{step + 1}", run.selector, state=run.trainer_state(step + 1))
        run.dist.barrier()
        if stop:
            stopped_at = step + 1
            break
    return _finish(run, stopped_at or args.steps, stopped_at is not None)


def build_parser(parser: Optional[argparse.ArgumentParser] = None):
    parser = parser or argparse.ArgumentParser(prog="autoselect train", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="folder of the frozen Hugging Face VLM (local, LLaVA-1.5)")
    parser.add_argument("--data", required=True, help="LLaVA-format JSON of training conversations")
    parser.add_argument("--images", help="folder the records' image paths are relative to (default: the JSON's folder)")
    parser.add_argument("--out", required=True, help="output folder (checkpoints, selector/, train_log.jsonl)")
    parser.add_argument("--keep", default="64",
                        help="visual tokens kept per image: K (e.g. 64), or LOW:HIGH (e.g. 16:192) to draw K per step "
                             "uniformly from that range (one selector for every budget)")
    parser.add_argument("--placement", choices=PLACEMENTS,
                        help="where the selector reads the tokens: projector_input (the features the projector "
                             "receives; the family's default for LLaVA) or projector_output")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8, help="images per micro-batch per process")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (PAPER: 2e-4)")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup", type=int, default=50, help="linear warm-up steps, then cosine decay to 0")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    parser.add_argument("--temperature", metavar="START:END",
                        help="soft top-K temperature from START to END over the run (PAPER: 2.0:0.1 with "
                             "--temperature-schedule cosine); default: --temperature-start to --temperature-end")
    parser.add_argument("--temperature-schedule", choices=TEMPERATURE_SCHEDULES, default="cosine",
                        help="how the temperature anneals (default cosine, the PAPER's; geometric: the first "
                             "release's)")
    parser.add_argument("--temperature-start", type=float, default=2.0)
    parser.add_argument("--temperature-end", type=float, default=0.1)
    parser.add_argument("--scorer-layers", type=int, default=2,
                        help="Transformer blocks of the Scorer (default 2, the PAPER's); 0: the per-token MLP")
    parser.add_argument("--scorer-width", type=int, default=1024, help="Scorer width (layers >= 1; PAPER: 1024)")
    parser.add_argument("--scorer-heads", type=int, default=16, help="Scorer attention heads (layers >= 1; PAPER: 16)")
    parser.add_argument("--scorer-mlp-ratio", type=int, default=4, help="Scorer MLP ratio (layers >= 1)")
    parser.add_argument("--scorer-hidden", type=int, default=256, help="hidden width of the per-token MLP (layers 0)")
    parser.add_argument("--denoiser", choices=("diagonal", "global", "none"), default="diagonal",
                        help="diagonal (memory slots, no information between tokens), global (full self-attention: "
                             "the leaking ablation) or none")
    parser.add_argument("--denoiser-heads", type=int, default=8)
    parser.add_argument("--denoiser-head-dim", type=int, default=64)
    parser.add_argument("--denoiser-mlp-ratio", type=int, default=2)
    parser.add_argument("--memory-slots", type=int, default=None,
                        help="the diagonal Denoiser's memory slots (default 0: the PAPER's identity-mask block; "
                             "OURS: e.g. 64)")
    parser.add_argument("--no-denoiser", action="store_true", help="the same as --denoiser none")
    parser.add_argument("--throttler", choices=("noise", "scale", "gumbel"), default="noise")
    parser.add_argument("--noise-stats", choices=("running", "unit"), default="unit",
                        help="the noise gate's mean and std: 0 and 1 (default, PAPER) or running token statistics "
                             "(OURS)")
    parser.add_argument("--soft-topk", choices=("logistic", "laplace"), default="laplace",
                        help="the budget gate: laplace (default, PAPER's LapSum) or logistic (OURS)")
    parser.add_argument("--stats-images", type=int, default=256, help="images for the token statistics")
    parser.add_argument("--val", help="LLaVA-format JSON of validation conversations (early stopping)")
    parser.add_argument("--val-images", help="folder of the validation images (default: the JSON's folder)")
    parser.add_argument("--val-every", type=int, default=50, help="steps between validation evaluations")
    parser.add_argument("--patience", type=int, default=0,
                        help="stop after this many validation evaluations without improvement (0: never)")
    parser.add_argument("--system", help="system line before the first turn (LLaVA-1.5 uses one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="the frozen VLM's dtype")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    parser.add_argument("--resume", help="a checkpoint folder, or 'latest' (in --out)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--check-frozen", action="store_true", help="assert the VLM's weights are unchanged at the end")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def run(args) -> dict:
    """`autoselect train` with parsed arguments: trains, prints a one-line summary, returns it."""
    summary = train(args)
    print(f"trained {summary['steps']} steps: loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}; "
          f"selector in {Path(args.out) / 'selector'}")
    return summary


def main(argv=None) -> int:
    run(build_parser().parse_args(argv))
    return 0
