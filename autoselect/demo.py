"""`autoselect demo`: the shipped tiny VLM and the shipped selector, measured end to end.

    autoselect demo [--version 2] [--vlm DIR] [--selector DIR] [--out demo] [--test N]

1. Writes the testbed's test split (seeded, the same images `python -m autoselect.testbed --version V`
   writes) under --data unless it is there already.
2. Evaluates the full model, AutoSelect and the training-free baselines at keep 192/128/64/32/16 of 576
   (`autoselect eval`'s harness), prints the table with each method's paired 95% interval against
   AutoSelect and the full model, writes eval.json / eval.csv.
3. Measures the prefill time of the tiny VLM at full and at keep 64 (else the smallest --keep;
   AutoSelect, scoring included), end to end (vision tower + selection + language model) and for the language model
   alone (pre-encoded image features, as `generate` passes them).
4. Draws a few test images with the kept tokens outlined at that keep (kept.png).

--version 1 (the default for now) is the first testbed with the repository's weights/tiny-vlm and
weights/tiny-vlm-selector (a source checkout only); --version 2 is testbed v2, whose tiny VLM and selector
are to ship inside the package (`autoselect/weights/`, so that the demo works from any install) once the
VLM reaches its target (issue 14); until then it says so and where they come from. Every output goes
under the current directory (--out demo, --data demo/testbed-vV). Everything runs offline on the CPU in a
few minutes.
"""

import argparse
import copy
import json
import os
import time
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_WEIGHTS = Path(__file__).resolve().parent / "weights"  # package data: installed with autoselect
# version -> (VLM, selector, test images, questions per image, how the weights are made)
SHIPPED = {
    1: (ROOT / "weights" / "tiny-vlm", ROOT / "weights" / "tiny-vlm-selector", 500, 1,
        "weights/tiny-vlm/README.md and weights/tiny-vlm-selector/README.md in a source checkout of autoselect"),
    2: (PACKAGE_WEIGHTS / "tiny-vlm-v2", PACKAGE_WEIGHTS / "tiny-vlm-v2-selector", 100, 3,
        "autoselect/weights/tiny-vlm-v2/README.md and tiny-vlm-v2-selector/README.md (package data, installed "
        "with autoselect)"),
}
# testbed v2 (issue 14): its weights ship as package data, so the demo runs from any install; v1's weights
# are in weights/ of a source checkout
DEFAULT_VERSION = 2


def _median_time(fn, repeats: int = 5) -> float:
    from .bench._timing import measure

    return measure(fn, torch.device("cpu"), repeats=repeats, warmup=2)[0]


@torch.no_grad()
def prefill_times(model, processor, selector, records, image_root: str, keep: int = 64, batch: int = 8) -> dict:
    """Median prefill milliseconds, full vs AutoSelect at `keep`: end to end and language model only."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from .integrations import apply, revert
    from .training.data import ConversationCollator
    from .hf import visual_tokens

    collator = ConversationCollator(processor, image_root)
    inputs = collator([dict(r, conversations=r["conversations"][:2]) for r in records[:batch]], answers=False)
    inputs.pop("labels")
    features = visual_tokens(model, inputs["pixel_values"])
    text_only = {k: v for k, v in inputs.items() if k != "pixel_values"}

    def end_to_end():
        model(**inputs, logits_to_keep=1)

    encoded = {"image": BaseModelOutputWithPooling(pooler_output=list(features))}

    def language_model():
        # a new (shallow-copied) encoder output per call: with the same object and prompt, apply's memo
        # would reuse the last selection and the time would leave the Scorer out
        model(**text_only, mm_encoder_outputs={"image": copy.copy(encoded["image"])}, logits_to_keep=1)

    times = {"full_end_to_end_ms": _median_time(end_to_end), "full_language_model_ms": _median_time(language_model)}
    apply(model, selector, method="autoselect", keep=keep)
    try:
        times["keep_end_to_end_ms"] = _median_time(end_to_end)
        # encoded by the patched model, so a selector placed at the projector's input finds its tokens
        with torch.no_grad():
            encoded["image"] = model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
        times["keep_language_model_ms"] = _median_time(language_model)
    finally:
        revert(model)
    times.update(keep=keep, batch=batch, tokens_per_image=int(features.shape[1]),
                 speedup_end_to_end=times["full_end_to_end_ms"] / times["keep_end_to_end_ms"],
                 speedup_language_model=times["full_language_model_ms"] / times["keep_language_model_ms"])
    return times


def build_parser(parser: Optional[argparse.ArgumentParser] = None):
    parser = parser or argparse.ArgumentParser(prog="autoselect demo", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", type=int, choices=sorted(SHIPPED), default=DEFAULT_VERSION,
                        help="testbed version and its shipped weights: 2 (default; package data) or 1 (weights/ of a "
                             "source checkout)")
    parser.add_argument("--vlm", default=None, help="the frozen tiny VLM (default: the version's shipped one)")
    parser.add_argument("--selector", default=None, help="the trained AutoSelector (default: the version's shipped one)")
    parser.add_argument("--data", default=None, help="where the test split is written (default: demo/testbed-vV)")
    parser.add_argument("--test", type=int, default=None,
                        help="test images (default: 500 with one question each for v1, 100 with three for v2)")
    parser.add_argument("--keep", default="192,128,64,32,16")
    parser.add_argument("--methods", default="full,autoselect,random,norm,fastv,visionzip,divprune")
    parser.add_argument("--out", default="demo", help="folder for eval.json, eval.csv, prefill.json, kept.png "
                                                      "(relative to the current directory)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


def run(args) -> dict:
    from .evaluation import evaluate, format_table, write_results
    from .modules.selector import AutoSelector
    from .show import show
    from .testbed import vlm as testbed_vlm
    from .training.data import load_records
    from .hf import load_vlm

    shipped_vlm, shipped_selector, test_images, questions_per_image, made_by = SHIPPED[args.version]
    args.vlm = str(args.vlm or shipped_vlm)
    args.selector = str(args.selector or shipped_selector)
    args.data = args.data or os.path.join("demo", f"testbed-v{args.version}")
    args.test = test_images if args.test is None else args.test
    for path, what in ((args.vlm, "VLM"), (args.selector, "selector")):
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"autoselect demo: {path} holds no model (the {what}); the shipped weights and the "
                                    f"commands that make them are described in {made_by}, or pass --vlm / --selector")
    torch.manual_seed(0)
    test_json = Path(args.data) / "test.json"
    if not test_json.is_file():
        print(f"writing the testbed v{args.version} test split ({args.test} images) to {args.data} ...", flush=True)
        testbed_vlm.data_module(args.version).write_split(args.data, "test", args.test, seed=0,
                                                          questions_per_image=questions_per_image,
                                                          progress=args.progress)
    records = load_records(str(test_json))
    model, processor = load_vlm(args.vlm)
    selector = AutoSelector.from_pretrained(args.selector)
    keeps = [int(k) for k in args.keep.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    started = time.time()
    rows = evaluate(model, processor, records, args.data, methods=methods, keeps=keeps, selector=selector,
                    progress=args.progress)
    print("\n".join(format_table(rows)))
    os.makedirs(args.out, exist_ok=True)
    write_results(rows, args.out, {"vlm": str(args.vlm), "selector": str(args.selector), "version": args.version,
                                   "questions": len(records), "test_images": len({r["image"] for r in records}),
                                   "seconds": round(time.time() - started, 1)})
    shown_keep = 64 if 64 in keeps else min(keeps)  # LLaVA-1.5's headline budget, for the timing and the picture
    times = prefill_times(model, processor, selector, records, args.data, keep=shown_keep)
    with open(os.path.join(args.out, "prefill.json"), "w") as handle:
        json.dump(times, handle, indent=1)
    print(f"prefill, batch {times['batch']}, keep {times['keep']} of {times['tokens_per_image']} tokens (AutoSelect, "
          f"scoring included): language model {times['full_language_model_ms']:.1f} -> "
          f"{times['keep_language_model_ms']:.1f} ms ({times['speedup_language_model']:.2f}x); end to end with the "
          f"vision tower {times['full_end_to_end_ms']:.1f} -> {times['keep_end_to_end_ms']:.1f} ms "
          f"({times['speedup_end_to_end']:.2f}x)")
    from PIL import Image

    images = list(dict.fromkeys(r["image"] for r in records))[:4]  # four distinct test images (v2 asks 3 per image)
    pictures = [Image.open(os.path.join(args.data, image)).convert("RGB") for image in images]
    shown = [m for m in ("autoselect", "divprune", "fastv", "random", "norm") if m in methods]
    sheet = show(model, processor, pictures, methods=shown, keep=shown_keep, selector=selector)
    sheet.save(os.path.join(args.out, "kept.png"))
    print(f"wrote {args.out}/eval.json, eval.csv, prefill.json and kept.png")
    return {"rows": rows, "prefill": times}
