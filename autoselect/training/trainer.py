"""`autoselect train`: train an AutoSelector on a frozen Hugging Face VLM with only its next-token loss.

    autoselect train --model PATH --data train.json --images DIR --out OUT --keep 64 [--steps ...]

Per step (DESIGN.md 1.5): the frozen vision tower and projector give the visual tokens V (no
gradient); the AutoSelector runs Scorer -> soft top-K (temperature annealed geometrically from
--temperature-start to --temperature-end) -> noise gate -> Denoiser; the frozen language model reads
Vhat in place of V (through transformers' `mm_encoder_outputs`, no patching) and its next-token loss
on the answer tokens is the only objective. Only the AutoSelector's parameters are trained (AdamW,
gradient accumulation, clipping); the VLM stays in eval mode with requires_grad off.

Deterministic from --seed: the data order (a permutation per epoch), the noise (counter-based:
micro-step m of rank r draws at offset (m * world + r) * ceil(numel / 4)) and the initialisation, so
a resumed run takes the same steps as an uninterrupted one, and W processes on B images each take
the same steps as one process on W * B (the loss is a sum over answer tokens divided by the global
count, the gradients are summed over processes). Several processes: `torchrun --nproc-per-node N
-m autoselect train ...` (gloo on the CPU, nccl on GPUs).

Checkpoints: OUT/checkpoint-<step>/ holds the selector (config.json + model.safetensors), the
optimizer state (optimizer.safetensors) and trainer_state.json; OUT/selector/ the final selector;
OUT/train_log.jsonl one line per logged step.
"""

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import torch

from ..modules.selector import AutoSelector
from ..ops.noise_gate import noise_offsets
from .data import IGNORE_INDEX, ConversationCollator, load_records


# ----------------------------------------------------------------------------------------------------
# The frozen VLM
# ----------------------------------------------------------------------------------------------------

def load_vlm(path: str, dtype: torch.dtype = torch.float32, device="cpu"):
    """(model, processor) from a local folder, frozen: eval mode, no parameter requires grad."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=dtype)
    return freeze(model.to(device)), processor


def freeze(model):
    """Eval mode and requires_grad off for every parameter; returns the model."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def text_width(model) -> int:
    config = model.config
    return int(getattr(getattr(config, "text_config", config), "hidden_size"))


@torch.no_grad()
def visual_tokens(model, pixel_values) -> torch.Tensor:
    """The projector's output for a batch of images: (B, N, D), no gradient."""
    output = model.get_image_features(pixel_values=pixel_values.to(model.device, model.dtype), return_dict=True)
    features = output.pooler_output if hasattr(output, "pooler_output") else output
    if isinstance(features, (list, tuple)):
        features = torch.stack(list(features))
    return features


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

def temperature_at(step: int, steps: int, start: float, end: float) -> float:
    """Geometric annealing from `start` (step 0) to `end` (the last step)."""
    if steps <= 1:
        return end
    return start * (end / start) ** (min(step, steps - 1) / (steps - 1))


def learning_rate_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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
    from safetensors.torch import save_file

    selector.save_pretrained(folder)
    optimizer_state = optimizer.state_dict()
    tensors = {}
    for index, entry in optimizer_state["state"].items():
        for name, value in entry.items():
            tensors[f"state.{index}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "trainer_state.json").write_text(json.dumps({**state, "param_groups": optimizer_state["param_groups"]},
                                                          indent=1) + "\n")


def restore_optimizer(folder: Path, optimizer, state: dict):
    """Load the optimizer state written by `save_checkpoint` into `optimizer`."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "optimizer.safetensors"))
    per_param = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})


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


def train(args) -> dict:
    """Run the training described by the parsed arguments (see `build_parser`). Returns a summary."""
    from tqdm.auto import tqdm

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dist = Distributed(device)
    if device.type == "cuda" and dist.active:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model, processor = load_vlm(args.model, dtype=dtype, device=device)
    frozen_before = {name: p.detach().clone() for name, p in model.named_parameters()} if args.check_frozen else None
    records = load_records(args.data)
    collator = ConversationCollator(processor, args.images or os.path.dirname(os.path.abspath(args.data)),
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
        state = json.loads((resume / "trainer_state.json").read_text())
        start_step = int(state["step"])
    else:
        torch.manual_seed(args.seed)
        denoiser = None if args.no_denoiser else {"heads": args.denoiser_heads, "head_dim": args.denoiser_head_dim,
                                                  "memory_slots": args.memory_slots, "mlp_ratio": 2}
        selector = AutoSelector(text_width(model), scorer_hidden=args.scorer_hidden, denoiser=denoiser,
                                keep=args.keep).to(device)
        start_step = 0
        statistics_indices = torch.randperm(len(records), generator=torch.Generator().manual_seed(args.seed))
        for begin in range(0, min(args.stats_images, len(records)), args.batch_size):
            chunk = [records[i] for i in statistics_indices[begin:min(begin + args.batch_size, args.stats_images)]]
            selector.update_statistics(visual_tokens(model, collator(chunk)["pixel_values"]).float())
    selector.train()
    parameters = [p for p in selector.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=args.weight_decay)
    if resume is not None:
        restore_optimizer(resume, optimizer, state)

    log_path = out / "train_log.jsonl"
    progress = tqdm(range(start_step, args.steps), desc="autoselect train", disable=dist.rank != 0 or not args.progress,
                    dynamic_ncols=True, initial=start_step, total=args.steps)
    summary = {"first_loss": None, "last_loss": None, "steps": args.steps}
    started = time.time()
    for step in progress:
        temperature = temperature_at(step, args.steps, args.temperature_start, args.temperature_end)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, args.steps, args.lr, args.warmup)
        batches = [collator([records[i] for i in batch_indices(step, micro, args.grad_accum, args.batch_size,
                                                              dist.world, dist.rank, len(records), args.seed)])
                   for micro in range(args.grad_accum)]
        answer_tokens = dist.sum_(torch.tensor(float(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches))))
        optimizer.zero_grad(set_to_none=True)
        loss_total, alpha_sums = torch.zeros((), dtype=torch.float64), []
        for micro, batch in enumerate(batches):
            tokens = visual_tokens(model, batch["pixel_values"]).float()
            micro_index = step * args.grad_accum + micro
            offset = (micro_index * dist.world + dist.rank) * noise_offsets(tokens.numel())
            vhat, alpha, _ = selector.gate(tokens, temperature=temperature, k=args.keep, seed=args.seed,
                                           offset=offset)
            loss = answer_loss_sum(forward_with_tokens(model, batch, vhat), batch["labels"]) / answer_tokens.item()
            loss.backward()
            loss_total += loss.detach().double().cpu()
            alpha_sums.append(alpha.detach().sum(-1))
        for parameter in parameters:  # sum over processes (each loss is already divided by the global count)
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        if dist.active:
            flat = torch.cat([p.grad.reshape(-1) for p in parameters])
            dist.sum_(flat)
            offset_p = 0
            for p in parameters:
                p.grad.copy_(flat[offset_p:offset_p + p.numel()].view_as(p))
                offset_p += p.numel()
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, args.clip)
        optimizer.step()
        loss_value = float(dist.sum_(loss_total.clone()))
        alpha_sum = torch.cat(alpha_sums)
        summary["first_loss"] = loss_value if summary["first_loss"] is None else summary["first_loss"]
        summary["last_loss"] = loss_value
        if dist.rank == 0:
            progress.set_postfix(loss=f"{loss_value:.3f}", T=f"{temperature:.3f}")
            if (step + 1) % args.log_every == 0 or step == start_step or step + 1 == args.steps:
                entry = {"step": step + 1, "loss": loss_value, "temperature": temperature,
                         "lr": optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm),
                         "alpha_sum_min": float(alpha_sum.min()), "alpha_sum_max": float(alpha_sum.max()),
                         "keep": args.keep, "elapsed_s": round(time.time() - started, 2)}
                with open(log_path, "a") as handle:
                    handle.write(json.dumps(entry) + "\n")
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
                save_checkpoint(out / f"checkpoint-{step + 1}", selector, optimizer,
                                {"step": step + 1, "seed": args.seed, "keep": args.keep})
        dist.barrier()
    if dist.rank == 0:
        selector.save_pretrained(out / "selector")
        save_checkpoint(out / f"checkpoint-{args.steps}", selector, optimizer,
                        {"step": args.steps, "seed": args.seed, "keep": args.keep})
    if frozen_before is not None:
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, frozen_before[n])]
        if changed:
            raise RuntimeError(f"the frozen VLM changed during training: {changed[:5]}")
    dist.barrier()
    dist.close()
    summary["selector"] = selector
    return summary


def build_parser(parser: Optional[argparse.ArgumentParser] = None):
    parser = parser or argparse.ArgumentParser(prog="autoselect train", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="folder of the frozen Hugging Face VLM (local, LLaVA family)")
    parser.add_argument("--data", required=True, help="LLaVA-format JSON of training conversations")
    parser.add_argument("--images", help="folder the records' image paths are relative to (default: the JSON's folder)")
    parser.add_argument("--out", required=True, help="output folder (checkpoints, selector/, train_log.jsonl)")
    parser.add_argument("--keep", type=int, default=64, help="visual tokens kept per image (the budget K)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=8, help="images per micro-batch per process")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    parser.add_argument("--temperature-start", type=float, default=1.0)
    parser.add_argument("--temperature-end", type=float, default=0.05)
    parser.add_argument("--scorer-hidden", type=int, default=256)
    parser.add_argument("--denoiser-heads", type=int, default=8)
    parser.add_argument("--denoiser-head-dim", type=int, default=64)
    parser.add_argument("--memory-slots", type=int, default=64)
    parser.add_argument("--no-denoiser", action="store_true", help="train the Scorer alone (z goes to the LM)")
    parser.add_argument("--stats-images", type=int, default=256, help="images for the token statistics")
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
