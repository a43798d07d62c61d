"""Where AutoSelect's prefill overhead goes (run on the H100 after run.sh): the LLaVA-1.5-7B language
model shape, batch 8, keep 64, with the untrained AutoSelector in float32 (as bench prefill times it)
and in the model's bfloat16; then torch.profiler over one call of each, top operators by device time.

    python benchmarks/results/gpu-2026-11-26b/overhead.py [--device cuda] [--shape 4096,32,64,576,8]
"""
import argparse
import sys

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import autoselect
from autoselect.bench import prefill
from autoselect.bench._timing import measure

parser = argparse.ArgumentParser()
parser.add_argument("--device", default="cuda")
parser.add_argument("--shape", default="4096,32,64,576,8")
parser.add_argument("--keep", type=int, default=64)
parser.add_argument("--repeats", type=int, default=10)
args = parser.parse_args()
shape = prefill.parse_shape(args.shape)
device = torch.device(args.device)
dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
model = prefill.build_model(shape["hidden"], shape["layers"], dtype, device)
inputs = prefill.make_inputs(model, shape["text"], shape["image"], shape.get("batch", 1), dtype, device)
short = prefill.make_inputs(model, shape["text"], args.keep, shape.get("batch", 1), dtype, device)


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def call(batch):
    encoded = BaseModelOutputWithPooling(pooler_output=list(batch["mm_encoder_outputs"]["image"].pooler_output))
    with torch.no_grad():
        out = model(**{**batch, "mm_encoder_outputs": {"image": encoded}}, logits_to_keep=1, use_cache=True)
    sync()
    return out


def timed(batch):
    return measure(lambda: call(batch), device, repeats=args.repeats, warmup=3)[0]


print(f"{args.shape} keep {args.keep} on {device} {dtype}", flush=True)
print(f"full {timed(inputs):.2f} ms; ceiling (text + {args.keep} image tokens) {timed(short):.2f} ms", flush=True)
torch.manual_seed(0)
base = autoselect.AutoSelector(shape["hidden"], denoiser=None).eval()
for name, sel_dtype in (("float32", torch.float32), ("bfloat16", dtype)):
    selector = base.to(device=device, dtype=sel_dtype)
    features = torch.randn(shape.get("batch", 1), shape["image"], shape["hidden"], device=device, dtype=sel_dtype)
    with torch.no_grad():
        select_ms = measure(lambda: (selector.select(list(features), [args.keep] * len(features)), sync()),
                            device, repeats=args.repeats, warmup=3)[0]
    autoselect.apply(model, selector, keep=args.keep)
    try:
        ms = timed(inputs)
        print(f"selector {name}: prefill {ms:.2f} ms; selector.select alone {select_ms:.2f} ms", flush=True)
        activities = [torch.profiler.ProfilerActivity.CPU] + (
            [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.profiler.profile(activities=activities) as prof:
            call(inputs)
        key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60), flush=True)
    finally:
        autoselect.revert(model)
sys.exit(0)
