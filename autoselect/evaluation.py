"""`autoselect eval`: accuracy of a VLM with every token, with AutoSelect and with the training-free
baselines, at several budgets, through one harness (DESIGN.md section 7).

    autoselect eval --model PATH --selector PATH --data test.json --keep 192,128,64 \\
        --methods full,autoselect,random,norm,fastv,visionzip,divprune --out results/

For each method and keep, the model is patched with `autoselect.apply(model, ...)` (reverted after),
each record's first question is answered greedily with `generate()`, and the first word of the
answer is compared with the reference (lower case, punctuation stripped): `score`, the package's one
evaluator (the testbed's VLM training validates with it too, through `accuracy_of`). Reported: accuracy overall
and per question type (the records' "type" field, when present), and retention = accuracy / the full
model's accuracy. Written: a table on stdout, eval.json and eval.csv in --out.

Paired differences (DESIGN.md section 7): for each method and keep, its accuracy minus AutoSelect's at
the same keep ("vs_autoselect") and minus the full model's ("vs_full"), over the same questions, with
a 95% interval from a paired bootstrap over questions (--resamples, default 2,000, seeded by
--bootstrap-seed): every resample draws question indices once and applies them to both methods'
per-question correctness, aligned by question id (the records' "id", else their position). An
interval that contains 0 is a tie and is reported as one ("tie" in the table, "tie": true in the files).
"""

import argparse
import csv
import json
import os
import string
import time
from collections import Counter
from typing import Dict, List, Optional, Sequence

import numpy as np
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


def correctness(predictions: Sequence[str], records: Sequence[dict]) -> List[int]:
    """1 / 0 per record: the predicted first word equals the record's first answer (normalised)."""
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    return [int(normalise(p) == normalise(r["conversations"][1]["value"])) for p, r in zip(predictions, records)]


def question_ids(records: Sequence[dict]) -> List[str]:
    """Each record's question id: its "id" field, else its position; ValueError on a repeated id."""
    ids = [str(r.get("id", index)) for index, r in enumerate(records)]
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise ValueError(f"question ids must be unique; repeated: {repeated}")
    return ids


def _aligned(correct_a, ids_a, correct_b, ids_b):
    """The two correctness vectors as float arrays in the order of `ids_a` (ValueError unless both
    cover the same questions exactly once)."""
    a, b = np.asarray(correct_a, dtype=np.float64), np.asarray(correct_b, dtype=np.float64)
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError("correctness vectors must be one-dimensional")
    if ids_a is None and ids_b is None:
        if len(a) != len(b):
            raise ValueError(f"paired comparison of {len(a)} and {len(b)} questions: not the same questions")
        return a, b
    if ids_a is None or ids_b is None:
        raise ValueError("give question ids for both correctness vectors or for neither")
    ids_a, ids_b = [str(i) for i in ids_a], [str(i) for i in ids_b]
    if len(ids_a) != len(a) or len(ids_b) != len(b):
        raise ValueError("each correctness vector needs one question id per entry")
    position = {qid: n for n, qid in enumerate(ids_b)}
    if len(position) != len(ids_b) or len(set(ids_a)) != len(ids_a):
        raise ValueError("question ids must be unique")
    if set(ids_a) != set(position):
        only_a, only_b = sorted(set(ids_a) - set(position)), sorted(set(position) - set(ids_a))
        raise ValueError(f"paired comparison over different questions: {len(only_a)} only in the first "
                         f"(e.g. {only_a[:3]}), {len(only_b)} only in the second (e.g. {only_b[:3]})")
    return a, b[np.array([position[qid] for qid in ids_a], dtype=np.int64)]


def paired_bootstrap(correct_a, correct_b, ids_a=None, ids_b=None, *, resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict:
    """Accuracy of A minus accuracy of B over the same questions, with a percentile interval from a
    paired bootstrap: each resample draws n question indices with replacement (a numpy generator seeded
    by `seed`) and applies them to both vectors (aligned by question id when ids are given). Returns
    {"difference", "low", "high", "tie" (the interval contains 0), "resamples", "level", "count"}."""
    a, b = _aligned(correct_a, ids_a, correct_b, ids_b)
    n = len(a)
    if n == 0:
        raise ValueError("paired bootstrap over no questions")
    if resamples < 1 or not 0 < level < 1:
        raise ValueError("resamples must be >= 1 and level in (0, 1)")
    per_question = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, (1 << 22) // n)  # bounded memory: at most ~4M indices at a time
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        indices = rng.integers(0, n, size=(count, n))
        means[start:start + count] = per_question[indices].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    low, high = float(min(low, high)), float(max(low, high))
    return {"difference": float(per_question.mean()), "low": low, "high": high, "tie": bool(low <= 0 <= high),
            "resamples": int(resamples), "level": level, "count": n}


def add_differences(rows: List[dict], *, resamples: int = 2000, seed: int = 0, level: float = 0.95,
                    reference: str = "autoselect") -> List[dict]:
    """Set each row's "vs_<reference>" (the difference of its accuracy to the `reference` method's row
    at the same keep, with its paired-bootstrap interval) and "vs_full" (to the full model's row);
    None where there is no such row or the row is the reference itself. Rows need "correct" and "ids"."""
    full = next((r for r in rows if r["method"] == "full"), None)
    references = {str(r["keep"]): r for r in rows if r["method"] == reference}
    for row in rows:
        for name, other in ((f"vs_{reference}", references.get(str(row["keep"]))), ("vs_full", full)):
            if other is None or other is row:
                row[name] = None
            else:
                row[name] = paired_bootstrap(row["correct"], other["correct"], row.get("ids"), other.get("ids"),
                                             resamples=resamples, seed=seed, level=level)
    return rows


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


def score(model, processor, records: Sequence[dict], image_root: str, *, batch_size: int = 16,
          max_new_tokens: int = 4, progress=None, collator: Optional[ConversationCollator] = None) -> dict:
    """The one scoring path of the package: greedy answers to each record's first question (`predict`,
    in eval mode under no_grad; the model's train/eval mode is restored after) scored against the
    references. Returns {"answers", "accuracy" (`accuracy`), "correct" (`correctness`)}. `evaluate` runs
    it per method and keep; the testbed's VLM training validates with it (`accuracy_of`)."""
    collator = collator or ConversationCollator(processor, image_root)
    was_training = model.training
    model.eval()
    try:
        answers = predict(model, collator, records, batch_size, max_new_tokens, progress)
    finally:
        model.train(was_training)
    return {"answers": answers, "accuracy": accuracy(answers, records), "correct": correctness(answers, records)}


def accuracy_of(model, processor, records: Sequence[dict], image_root: str, *, batch_size: int = 16,
                max_new_tokens: int = 4) -> Dict[str, float]:
    """The model's accuracy as it is (no pruning): {"all": ..., <type>: ...} of `score`."""
    scored = score(model, processor, records, image_root, batch_size=batch_size, max_new_tokens=max_new_tokens)
    return scored["accuracy"]


def evaluate(model, processor, records: Sequence[dict], image_root: str, *, methods: Sequence[str] = METHODS,
             keeps: Sequence = (192, 128, 64), selector=None, batch_size: int = 16, max_new_tokens: int = 4,
             seed: int = 0, progress: bool = True, resamples: int = 2000, bootstrap_seed: int = 0,
             positions: str = "original") -> List[dict]:
    """Accuracy rows, one per (method, keep): {"method", "keep", "accuracy": {...}, "retention",
    "seconds", "count", "correct" (1/0 per question), "ids" (the question ids), "vs_autoselect",
    "vs_full" (paired differences with 95% bootstrap intervals, see `add_differences`)}. "full" runs
    once (keep "all"). `positions` is `autoselect.apply`'s ("compact": the pruned prompt's own positions,
    as vLLM serves LLaVA). The model is left unpatched."""
    from tqdm.auto import tqdm

    from .integrations import apply, revert

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if "autoselect" in methods and selector is None:
        raise ValueError("method 'autoselect' needs a selector (--selector PATH)")
    collator = ConversationCollator(processor, image_root)
    ids = question_ids(records)
    model.eval()
    runs = [("full", "all")] if "full" in methods else []
    runs += [(m, k) for m in methods if m != "full" for k in keeps]
    rows, full_accuracy = [], None
    bar = tqdm(total=len(runs) * len(records), desc="autoselect eval", disable=not progress, dynamic_ncols=True)
    for method, keep in runs:
        bar.set_postfix(method=method, keep=keep)
        started = time.time()
        options = {"seed": seed} if method == "random" else {}
        if method != "full":
            apply(model, selector if method == "autoselect" else None, method=method, keep=keep,
                  positions=positions, **options)
        try:
            scored = score(model, processor, records, image_root, batch_size=batch_size,
                           max_new_tokens=max_new_tokens, progress=bar, collator=collator)
        finally:
            if method != "full":
                revert(model)
        scores = scored["accuracy"]
        if method == "full":
            full_accuracy = scores["all"]
        rows.append({"method": method, "keep": keep, "accuracy": scores,
                     "retention": scores["all"] / full_accuracy if full_accuracy else None,
                     "seconds": round(time.time() - started, 2), "count": len(records),
                     "correct": scored["correct"], "ids": ids})
    bar.close()
    if records:
        add_differences(rows, resamples=resamples, seed=bootstrap_seed)
    return rows


COMPARISONS = ("vs_autoselect", "vs_full")


def format_difference(difference: Optional[dict]) -> str:
    """"-0.040 [-0.080,+0.000] tie": the difference, its interval, "tie" when the interval holds 0."""
    if not difference:
        return "-"
    text = f"{difference['difference']:+.3f} [{difference['low']:+.3f},{difference['high']:+.3f}]"
    return text + (" tie" if difference["tie"] else "")


def format_table(rows: Sequence[dict], label: str = "method") -> List[str]:
    """One line per row: accuracy, retention, the paired differences to AutoSelect at the same keep and
    to the full model with their 95% intervals (columns shown when some row has them), per-type accuracy."""
    types = [t for t in rows[0]["accuracy"] if t != "all"] if rows else []
    comparisons = [c for c in COMPARISONS if any(row.get(c) for row in rows)]
    width = max([11, len(label)] + [len(str(row["method"])) for row in rows])
    titles = {"vs_autoselect": "vs autoselect [95% CI]", "vs_full": "vs full [95% CI]"}
    header = (f"{label:<{width}} {'keep':>5} {'accuracy':>9} {'retention':>10}  "
              + "".join(f"{titles[c]:<29}" for c in comparisons) + " ".join(f"{t:>9}" for t in types))
    lines = [header, "-" * len(header)]
    for row in rows:
        retention = f"{row['retention']:.1%}" if row["retention"] is not None else "-"
        lines.append(f"{row['method']:<{width}} {str(row['keep']):>5} {row['accuracy']['all']:>9.3f} {retention:>10}  "
                     + "".join(f"{format_difference(row.get(c)):<29}" for c in comparisons)
                     + " ".join(f"{row['accuracy'].get(t, float('nan')):>9.3f}" for t in types))
    return lines


def _json_rows(rows: Sequence[dict]):
    """(rows without their question ids, the ids shared by every row or None): eval.json stores a
    shared id list once; rows over different questions keep their own."""
    id_lists = [row.get("ids") for row in rows]
    shared = id_lists[0] if id_lists and all(ids == id_lists[0] for ids in id_lists) else None
    if shared is None:
        return list(rows), None
    return [{k: v for k, v in row.items() if k != "ids"} for row in rows], shared


CSV_HEADER = ["method", "keep", "type", "accuracy", "retention", "count"] + [
    f"{field}_{c}" for c in COMPARISONS for field in ("difference", "low", "high", "tie")]


def _csv_differences(row: dict, kind: str) -> List[str]:
    cells = []
    for c in COMPARISONS:
        difference = row.get(c) if kind == "all" else None  # the intervals are over all questions
        cells += ([f"{difference[k]:.4f}" for k in ("difference", "low", "high")] + [str(difference["tie"]).lower()]
                  if difference else ["", "", "", ""])
    return cells


def write_results(rows: Sequence[dict], out: str, meta: Optional[dict] = None):
    """eval.json (`meta`, the rows with their per-question correctness, the question ids) and eval.csv
    (one line per method, keep and question type; the paired differences on the "all" lines)."""
    os.makedirs(out, exist_ok=True)
    saved_rows, ids = _json_rows(rows)
    with open(os.path.join(out, "eval.json"), "w") as handle:
        json.dump({"meta": meta or {}, "rows": saved_rows, "question_ids": ids}, handle, indent=1)
    with open(os.path.join(out, "eval.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_HEADER)
        for row in rows:
            for kind, value in row["accuracy"].items():
                writer.writerow([row["method"], row["keep"], kind, f"{value:.4f}",
                                 "" if row["retention"] is None else f"{row['retention']:.4f}", row["count"]]
                                + _csv_differences(row, kind))


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
    parser.add_argument("--resamples", type=int, default=2000, help="paired-bootstrap resamples (95%% intervals)")
    parser.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the paired bootstrap")
    parser.add_argument("--positions", choices=("original", "compact"), default="original",
                        help="positions of the pruned prompt: the unpruned ones (default) or its own (compact, "
                             "as vLLM serves LLaVA; 1-D position families only)")
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
                    max_new_tokens=args.max_new_tokens, seed=args.seed, progress=args.progress,
                    resamples=args.resamples, bootstrap_seed=args.bootstrap_seed, positions=args.positions)
    print("\n".join(format_table(rows)))
    if args.out:
        write_results(rows, args.out, {"model": args.model, "selector": args.selector, "data": args.data,
                                       "device": str(device), "dtype": args.dtype, "positions": args.positions, "resamples": args.resamples,
                                       "bootstrap_seed": args.bootstrap_seed})
        print(f"wrote {os.path.join(args.out, 'eval.json')} and eval.csv")
    return rows
