"""`autoselect eval`: accuracy of a VLM with every token, with AutoSelect and with the training-free
baselines, at several budgets, through one harness (DESIGN.md section 7).

    autoselect eval --model PATH --selector PATH --data test.json --keep 192,128,64 \\
        --methods full,autoselect,random,norm,fastv,visionzip,divprune --out results/

For each method and keep, the model is patched with `autoselect.apply(model, ...)` (reverted after),
each record's first question is answered greedily with `generate()`, and the first word of the
answer is compared with the reference (lower case, punctuation stripped). Reported: accuracy overall
and per question type (the records' "type" field, when present), and retention = accuracy / the full
model's accuracy. Written: a table on stdout, eval.json and eval.csv in --out.
"""

import argparse
import csv
import json
import os
import string
import time
from collections import Counter
from typing import Dict, List, Optional, Sequence

import torch

from .baselines import METHODS as BASELINE_METHODS
from .training.data import ConversationCollator, load_records

METHODS = ("full",) + BASELINE_METHODS  # "full": the unpatched model


def normalise(text: str) -> str:
    """The first word of `text`, lower case, without surrounding punctuation ('' for no word)."""
    words = text.strip().split()
    return words[0].strip(string.punctuation).lower() if words else ""


def accuracy(predictions: Sequence[str], records: Sequence[dict]) -> Dict[str, float]:
    """{"all": accuracy, <type>: accuracy, ...} of predicted first words against each record's
    first answer (normalised both sides)."""
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    correct, total = Counter(), Counter()
    for predicted, record in zip(predictions, records):
        hit = int(normalise(predicted) == normalise(record["conversations"][1]["value"]))
        for key in ("all", record.get("type")):
            if key is not None:
                correct[key] += hit
                total[key] += 1
    return {key: correct[key] / total[key] for key in sorted(total, key=lambda k: (k != "all", k))}


@torch.no_grad()
def predict(model, collator: ConversationCollator, records: Sequence[dict], batch_size: int = 16,
            max_new_tokens: int = 4, progress=None) -> List[str]:
    """Greedy answers (decoded text) to the first question of each record."""
    answers = []
    for start in range(0, len(records), batch_size):
        chunk = [dict(r, conversations=r["conversations"][:2]) for r in records[start:start + batch_size]]
        batch = collator(chunk, answers=False)
        batch.pop("labels")
        batch = {k: v.to(model.device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
        generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=collator.pad_id)
        new_tokens = generated[:, batch["input_ids"].shape[1]:]
        answers += collator.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        if progress is not None:
            progress.update(len(chunk))
    return answers


def evaluate(model, processor, records: Sequence[dict], image_root: str, *, methods: Sequence[str] = METHODS,
             keeps: Sequence = (192, 128, 64), selector=None, batch_size: int = 16, max_new_tokens: int = 4,
             seed: int = 0, progress: bool = True) -> List[dict]:
    """Accuracy rows, one per (method, keep): {"method", "keep", "accuracy": {...}, "retention",
    "seconds"}. "full" runs once (keep "all"). The model is left unpatched."""
    from tqdm.auto import tqdm

    from .integrations import apply, revert

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if "autoselect" in methods and selector is None:
        raise ValueError("method 'autoselect' needs a selector (--selector PATH)")
    collator = ConversationCollator(processor, image_root)
    model.eval()
    runs = [("full", "all")] if "full" in methods else []
    runs += [(m, k) for m in methods if m != "full" for k in keeps]
    rows, full_accuracy = [], None
    bar = tqdm(total=len(runs) * len(records), desc="autoselect eval", disable=not progress, dynamic_ncols=True)
    for method, keep in runs:
        bar.set_postfix(method=method, keep=keep)
        started = time.time()
        if method == "full":
            answers = predict(model, collator, records, batch_size, max_new_tokens, bar)
        else:
            options = {"seed": seed} if method == "random" else {}
            apply(model, selector if method == "autoselect" else None, method=method, keep=keep, **options)
            try:
                answers = predict(model, collator, records, batch_size, max_new_tokens, bar)
            finally:
                revert(model)
        scores = accuracy(answers, records)
        if method == "full":
            full_accuracy = scores["all"]
        rows.append({"method": method, "keep": keep, "accuracy": scores,
                     "retention": scores["all"] / full_accuracy if full_accuracy else None,
                     "seconds": round(time.time() - started, 2), "count": len(records)})
    bar.close()
    return rows


def format_table(rows: Sequence[dict]) -> List[str]:
    types = [t for t in rows[0]["accuracy"] if t != "all"] if rows else []
    header = f"{'method':<11} {'keep':>5} {'accuracy':>9} {'retention':>10}  " + " ".join(f"{t:>9}" for t in types)
    lines = [header, "-" * len(header)]
    for row in rows:
        retention = f"{row['retention']:.1%}" if row["retention"] is not None else "-"
        lines.append(f"{row['method']:<11} {str(row['keep']):>5} {row['accuracy']['all']:>9.3f} {retention:>10}  "
                     + " ".join(f"{row['accuracy'].get(t, float('nan')):>9.3f}" for t in types))
    return lines


def write_results(rows: Sequence[dict], out: str, meta: Optional[dict] = None):
    """eval.json (rows and `meta`) and eval.csv (one line per method, keep and question type)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "eval.json"), "w") as handle:
        json.dump({"meta": meta or {}, "rows": list(rows)}, handle, indent=1)
    with open(os.path.join(out, "eval.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "keep", "type", "accuracy", "retention", "count"])
        for row in rows:
            for kind, value in row["accuracy"].items():
                writer.writerow([row["method"], row["keep"], kind, f"{value:.4f}",
                                 "" if row["retention"] is None else f"{row['retention']:.4f}", row["count"]])


def _keeps(text: str):
    values = []
    for part in text.split(","):
        values.append(float(part) if "." in part else int(part))
    return values


def build_parser(parser: Optional[argparse.ArgumentParser] = None):
    parser = parser or argparse.ArgumentParser(prog="autoselect eval", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="folder of the Hugging Face VLM (local)")
    parser.add_argument("--selector", help="folder of an AutoSelector (needed for method autoselect)")
    parser.add_argument("--data", required=True, help="LLaVA-format JSON of questions with reference answers")
    parser.add_argument("--images", help="folder the records' image paths are relative to (default: the JSON's folder)")
    parser.add_argument("--keep", type=_keeps, default=[192, 128, 64], help="comma-separated budgets (default 192,128,64)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    parser.add_argument("--limit", type=int, help="evaluate the first N records only")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--out", help="folder for eval.json and eval.csv")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


def run(args) -> List[dict]:
    """`autoselect eval` with parsed arguments: prints the table, writes the files, returns the rows."""
    from .modules.selector import AutoSelector
    from .hf import load_vlm

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model, processor = load_vlm(args.model, dtype=dtype, device=device)
    selector = AutoSelector.from_pretrained(args.selector, device=device) if args.selector else None
    records = load_records(args.data)[:args.limit]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rows = evaluate(model, processor, records, args.images or os.path.dirname(os.path.abspath(args.data)),
                    methods=methods, keeps=args.keep, selector=selector, batch_size=args.batch_size,
                    max_new_tokens=args.max_new_tokens, seed=args.seed, progress=args.progress)
    print("\n".join(format_table(rows)))
    if args.out:
        write_results(rows, args.out, {"model": args.model, "selector": args.selector, "data": args.data,
                                       "device": str(device), "dtype": args.dtype})
        print(f"wrote {os.path.join(args.out, 'eval.json')} and eval.csv")
    return rows
