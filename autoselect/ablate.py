"""`autoselect ablate`: the ablation table (DESIGN.md section 1 item 7, the paper's Table 5) on one testbed.

    autoselect ablate --model PATH --data train.json --test test.json --out ablation/ \\
        [--variants full,throttler-gumbel,...] [--steps 1000] [--keep-list 192,128,64,32,16] [training flags]

Every variant is trained in this process by the trainer (`autoselect train`) with the same data,
steps and seed: "full" with the given training flags (the base), each other variant with exactly
one option changed from the base:

  throttler-gumbel  --throttler gumbel (hard top-K + Gumbel noise, straight-through: "GumbelDiffPrune")
  throttler-scale   --throttler scale (z = alpha X)
  denoiser-global   --denoiser global (full self-attention: the leaking variant; it has no memory slots)
  denoiser-none     --denoiser none
  noise-stats       --noise-stats running <-> unit
  memory-slots      --memory-slots: the base's slots -> 0 (the identity-mask block); 0 (the default) -> 64
  soft-topk         --soft-topk logistic <-> laplace
  scorer            --scorer-layers 0 (per-token MLP) <-> 2 (Transformer, --scorer-width/--scorer-heads)
  keep              --keep K (fixed) -> --other-keep (default 16:192); a range LOW:HIGH -> HIGH
  scorer+keep       both of those changes (the 2 x 2 of scorer and budget range with the two above)

Any variants joined by "+" (e.g. "soft-topk+noise-stats") apply their changes one after the other.
A variant that equals the base (e.g. throttler-gumbel when the base is gumbel) is an error. Each
trained selector (OUT/variants/<name>/selector) is then evaluated with `autoselect eval`'s harness
(method autoselect) at every keep of --keep-list on the questions of --test, the full model once.
Reported per variant and keep: accuracy (overall and per question type), retention (accuracy / the
full model's), and the paired difference to the full variant at the same keep with its 95% paired-
bootstrap interval over the same questions ("tie" when it contains 0). Written: ablation.json (rows
with per-question correctness, the question ids, each variant's change and training summary) and
ablation.csv in --out; the table on stdout.
"""

import argparse
import copy
import csv
import json
import os
import time
from pathlib import Path
from typing import List, Optional

import torch

from . import evaluation
from .training import trainer

SINGLE_VARIANTS = ("full", "throttler-gumbel", "throttler-scale", "denoiser-global", "denoiser-none", "noise-stats",
                   "memory-slots", "soft-topk", "scorer", "keep")
VARIANTS = SINGLE_VARIANTS + ("scorer+keep",)  # the default list
MEMORY_SLOTS = 64  # the memory-slots variant's count when the base has none (OURS)


def _denoiser(args) -> str:
    return "none" if args.no_denoiser else args.denoiser


def variant_args(base: argparse.Namespace, name: str, other_keep: Optional[str] = None):
    """(training arguments of variant `name`, "what changed" text): a copy of `base` with one option
    changed ("a+b": a's change, then b's). ValueError for an unknown variant or one that equals the base."""
    if "+" in name:
        parts = name.split("+")
        if "full" in parts or len(set(parts)) != len(parts) or not all(parts):
            raise ValueError(f"variant {name!r}: join distinct variants other than full with '+'")
        args, changes = base, []
        for part in parts:
            args, change = variant_args(args, part, other_keep)
            changes.append(change)
        return args, "; ".join(changes)
    args = copy.deepcopy(base)
    args.no_denoiser = False
    args.denoiser = _denoiser(base)
    if name == "full":
        return args, "-"
    if name in ("throttler-gumbel", "throttler-scale"):
        value = name.split("-", 1)[1]
        if base.throttler == value:
            raise ValueError(f"variant {name}: the base already uses --throttler {value}")
        args.throttler = value
        return args, f"throttler {base.throttler} -> {value}"
    if name in ("denoiser-global", "denoiser-none"):
        value = name.split("-", 1)[1]
        if args.denoiser == value:
            raise ValueError(f"variant {name}: the base already uses --denoiser {value}")
        args.denoiser = value
        change = f"denoiser {_denoiser(base)} -> {value}"
        if value == "global":
            args.memory_slots = 0  # the global-attention Denoiser has no memory
            slots = base.memory_slots if base.memory_slots is not None else trainer.DEFAULT_MEMORY_SLOTS
            if _denoiser(base) == "diagonal" and slots:
                change += f" (no memory: memory_slots {slots} -> 0)"
        return args, change
    if name == "noise-stats":
        args.noise_stats = {"running": "unit", "unit": "running"}[base.noise_stats]
        return args, f"noise_stats {base.noise_stats} -> {args.noise_stats}"
    if name == "memory-slots":
        if args.denoiser != "diagonal":
            raise ValueError("variant memory-slots needs the diagonal Denoiser, the base has "
                             f"--denoiser {args.denoiser}")
        slots = trainer.DEFAULT_MEMORY_SLOTS if base.memory_slots is None else base.memory_slots
        args.memory_slots = 0 if slots else MEMORY_SLOTS
        return args, f"memory_slots {slots} -> {args.memory_slots}"
    if name == "soft-topk":
        args.soft_topk = {"logistic": "laplace", "laplace": "logistic"}[base.soft_topk]
        return args, f"soft_topk {base.soft_topk} -> {args.soft_topk}"
    if name == "scorer":
        args.scorer_layers = 2 if base.scorer_layers == 0 else 0
        return args, f"scorer_layers {base.scorer_layers} -> {args.scorer_layers}"
    if name == "keep":
        low, high = trainer.parse_keep(base.keep)
        args.keep = (other_keep or "16:192") if low == high else str(high)
        if trainer.parse_keep(args.keep) == (low, high):
            raise ValueError(f"variant keep: --other-keep {args.keep} equals the base --keep {base.keep}")
        return args, f"keep {base.keep} -> {args.keep}"
    raise ValueError(f"unknown variant {name!r}; choose from {', '.join(SINGLE_VARIANTS)} (or join them with '+')")


def parse_variants(text: Optional[str]) -> List[str]:
    """The variants to run, "full" first (always: it is the reference); ValueError for unknown names."""
    names = [v.strip() for v in (text or ",".join(VARIANTS)).split(",") if v.strip()]
    unknown = [v for v in names if not all(part in SINGLE_VARIANTS for part in v.split("+"))]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    return ["full"] + [v for v in dict.fromkeys(names) if v != "full"]


def _keep_list(text: str) -> List[int]:
    try:
        keeps = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        keeps = []
    if not keeps or min(keeps) < 1:
        raise argparse.ArgumentTypeError(f"--keep-list takes comma-separated integers >= 1, got {text!r}")
    return keeps


def build_parser(parser: Optional[argparse.ArgumentParser] = None):
    parser = parser or argparse.ArgumentParser(prog="autoselect ablate", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    trainer.build_parser(parser)  # every training flag: the base (full) variant's options
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for action in parser._actions:  # the trainer's --out: here the ablation's folder
        if action.dest == "out":
            action.help = "output folder: ablation.json, ablation.csv, variants/<name>/ (each variant's training)"
    group = parser.add_argument_group("ablation")
    group.add_argument("--variants", help=f"comma-separated list from {','.join(SINGLE_VARIANTS)}, or several joined "
                                          f"with '+' (default: {','.join(VARIANTS)}; full always runs, as the "
                                          "reference)")
    group.add_argument("--keep-list", type=_keep_list, default=[192, 128, 64, 32, 16],
                       help="budgets every selector is evaluated at (default 192,128,64,32,16)")
    group.add_argument("--other-keep", default="16:192", help="the keep variant's --keep when the base's is fixed")
    group.add_argument("--test", required=True, help="LLaVA-format JSON of evaluation questions with reference answers")
    group.add_argument("--test-images", help="folder of the test images (default: the JSON's folder)")
    group.add_argument("--limit", type=int, help="evaluate the first N questions only")
    group.add_argument("--eval-batch-size", type=int, default=16)
    group.add_argument("--max-new-tokens", type=int, default=4)
    group.add_argument("--resamples", type=int, default=2000, help="paired-bootstrap resamples (95%% intervals)")
    group.add_argument("--bootstrap-seed", type=int, default=0)
    return parser


def _train_variant(args, out: Path) -> dict:
    args = copy.deepcopy(args)
    args.out = str(out)
    summary = trainer.train(args)
    summary.pop("selector", None)
    return {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool, type(None)))}


def ablate(args) -> dict:
    """Train every variant, evaluate every selector, compare each with the full variant. Returns
    {"rows", "full_model", "variants": {name: {"change", "selector", "config", "train"}}, "question_ids"}."""
    from .hf import load_vlm
    from .modules.selector import AutoSelector
    from .training.data import load_records

    if args.resume:
        raise ValueError("autoselect ablate trains every variant from scratch; --resume is not supported")
    names = parse_variants(args.variants)
    plans = {name: variant_args(args, name, args.other_keep) for name in names}  # all errors before any training
    out = Path(args.out)
    variants = {}
    for name, (variant, change) in plans.items():
        print(f"ablate: training variant {name} ({change}) ...", flush=True)
        folder = out / "variants" / name
        started = time.time()
        summary = _train_variant(variant, folder)
        config = json.loads((folder / "selector" / "config.json").read_text())
        variants[name] = {"change": change, "selector": str(folder / "selector"), "config": config,
                          "train": dict(summary, seconds=round(time.time() - started, 1))}

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model, processor = load_vlm(args.model, dtype=dtype, device=device)
    records = load_records(args.test)[:args.limit]
    image_root = args.test_images or os.path.dirname(os.path.abspath(args.test))
    options = dict(batch_size=args.eval_batch_size, max_new_tokens=args.max_new_tokens, progress=args.progress,
                   resamples=args.resamples, bootstrap_seed=args.bootstrap_seed)
    print("ablate: evaluating the full model ...", flush=True)
    full_model = evaluation.evaluate(model, processor, records, image_root, methods=["full"], **options)[0]
    rows = []
    for name in names:
        print(f"ablate: evaluating variant {name} at keep {','.join(map(str, args.keep_list))} ...", flush=True)
        selector = AutoSelector.from_pretrained(variants[name]["selector"], device=device)
        for row in evaluation.evaluate(model, processor, records, image_root, methods=["autoselect"],
                                       keeps=args.keep_list, selector=selector, **options):
            full_accuracy = full_model["accuracy"]["all"]
            rows.append({"variant": name, "change": variants[name]["change"], "keep": row["keep"],
                         "accuracy": row["accuracy"], "retention": row["accuracy"]["all"] / full_accuracy
                         if full_accuracy else None, "count": row["count"], "seconds": row["seconds"],
                         "correct": row["correct"], "ids": row["ids"]})
    reference = {row["keep"]: row for row in rows if row["variant"] == "full"}
    for row in rows:
        other = reference[row["keep"]]
        row["vs_full_variant"] = None if other is row else evaluation.paired_bootstrap(
            row["correct"], other["correct"], row["ids"], other["ids"], resamples=args.resamples,
            seed=args.bootstrap_seed)
        row["vs_full"] = evaluation.paired_bootstrap(row["correct"], full_model["correct"], row["ids"],
                                                     full_model["ids"], resamples=args.resamples,
                                                     seed=args.bootstrap_seed)
    return {"rows": rows, "full_model": full_model, "variants": variants}


def format_table(result: dict) -> List[str]:
    rows = result["rows"]
    types = [t for t in rows[0]["accuracy"] if t != "all"] if rows else []
    width = max([16] + [len(r["variant"]) for r in rows])
    header = (f"{'variant':<{width}} {'keep':>5} {'accuracy':>9} {'retention':>10}  {'vs full variant [95% CI]':<29}"
              + " ".join(f"{t:>9}" for t in types))
    full = result["full_model"]
    lines = [f"full model (every token): accuracy {full['accuracy']['all']:.3f} on {full['count']} questions",
             header, "-" * len(header)]
    for row in rows:
        retention = f"{row['retention']:.1%}" if row["retention"] is not None else "-"
        lines.append(f"{row['variant']:<{width}} {row['keep']:>5} {row['accuracy']['all']:>9.3f} {retention:>10}  "
                     f"{evaluation.format_difference(row['vs_full_variant']):<29}"
                     + " ".join(f"{row['accuracy'].get(t, float('nan')):>9.3f}" for t in types))
    changes = [f"  {name}: {v['change']}" for name, v in result["variants"].items() if name != "full"]
    return lines + (["changes from the full variant:"] + changes if changes else [])


CSV_HEADER = ["variant", "change", "keep", "type", "accuracy", "retention", "count",
              "difference_vs_full_variant", "low_vs_full_variant", "high_vs_full_variant", "tie_vs_full_variant"]


def write_results(result: dict, out: str, meta: Optional[dict] = None):
    """ablation.json and ablation.csv (one line per variant, keep and question type; the paired
    difference to the full variant on the "all" lines)."""
    os.makedirs(out, exist_ok=True)
    ids = result["full_model"]["ids"]
    strip = lambda row: {k: v for k, v in row.items() if k != "ids"}  # noqa: E731
    if any(row["ids"] != ids for row in result["rows"]):
        raise ValueError("ablation rows over different questions")
    payload = {"meta": meta or {}, "variants": result["variants"], "full_model": strip(result["full_model"]),
               "rows": [strip(r) for r in result["rows"]], "question_ids": ids}
    with open(os.path.join(out, "ablation.json"), "w") as handle:
        json.dump(payload, handle, indent=1)
    with open(os.path.join(out, "ablation.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_HEADER)
        for row in result["rows"]:
            for kind, value in row["accuracy"].items():
                difference = row["vs_full_variant"] if kind == "all" else None
                cells = ([f"{difference[k]:.4f}" for k in ("difference", "low", "high")]
                         + [str(difference["tie"]).lower()]) if difference else ["", "", "", ""]
                writer.writerow([row["variant"], row["change"], row["keep"], kind, f"{value:.4f}",
                                 "" if row["retention"] is None else f"{row['retention']:.4f}", row["count"]] + cells)


def run(args) -> dict:
    """`autoselect ablate` with parsed arguments: trains, evaluates, prints the table, writes the files."""
    started = time.time()
    result = ablate(args)
    print("\n".join(format_table(result)))
    write_results(result, args.out, {"model": args.model, "data": args.data, "test": args.test, "steps": args.steps,
                                     "seed": args.seed, "keep_list": args.keep_list, "resamples": args.resamples,
                                     "bootstrap_seed": args.bootstrap_seed, "seconds": round(time.time() - started, 1)})
    print(f"wrote {os.path.join(args.out, 'ablation.json')} and ablation.csv")
    return result
