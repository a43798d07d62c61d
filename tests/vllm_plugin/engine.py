"""Run one case of `reference.json` on vLLM (in vLLM's environment), in process.

    build/vllm-venv/bin/python tests/vllm_plugin/engine.py REFERENCE_DIR CASE_NAME [--tp 2]

prints one JSON line: the prompts' lengths and the greedy tokens and log-probabilities per prompt.
The tests call `run_case` directly; the script form serves tensor parallelism (its own process).
"""

import argparse
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes most of the memory


def load_case(reference_dir, name):
    with open(os.path.join(reference_dir, "reference.json")) as handle:
        reference = json.load(handle)
    case = next(c for c in reference["cases"] if c["name"] == name)
    return reference, case


def engine_kwargs(case, settings=None):
    """LLM(...) arguments of a case; settings: the plugin's settings (default: the case's)."""
    if settings is None and case["method"] is not None:
        settings = {"method": case["method"], "keep": case["keep"]}
        if case["method"] == "autoselect":
            settings["selector"] = case["selector"]
    kwargs = dict(model=case["model"], dtype="float32", max_model_len=1024, enforce_eager=True,
                  limit_mm_per_prompt={"image": 1}, seed=0, max_num_seqs=8)
    if settings is not None:
        kwargs["hf_overrides"] = {"autoselect": settings}
    return kwargs


def generate(llm, case, max_new_tokens):
    from PIL import Image
    from vllm import SamplingParams

    requests = [{"prompt": p, "multi_modal_data": {"image": Image.open(i).convert("RGB")}}
                for p, i in zip(case["prompts"], case["images"])]
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, logprobs=0, ignore_eos=True)
    outputs = llm.generate(requests, params, use_tqdm=False)
    results = []
    for out in outputs:
        completion = out.outputs[0]
        logprobs = [step[t].logprob for step, t in zip(completion.logprobs, completion.token_ids)]
        results.append({"prompt_len": len(out.prompt_token_ids), "tokens": list(completion.token_ids),
                        "logprobs": logprobs})
    return results


def run_case(reference_dir, name, tensor_parallel_size=1, settings=None):
    from vllm import LLM

    reference, case = load_case(reference_dir, name)
    kwargs = engine_kwargs(case, settings)
    if tensor_parallel_size > 1:
        kwargs["tensor_parallel_size"] = tensor_parallel_size
        kwargs["distributed_executor_backend"] = "mp"
    llm = LLM(**kwargs)
    try:
        return generate(llm, case, reference["max_new_tokens"])
    finally:
        del llm


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("reference_dir")
    parser.add_argument("case")
    parser.add_argument("--tp", type=int, default=1)
    args = parser.parse_args(argv)
    print("RESULT " + json.dumps(run_case(args.reference_dir, args.case, args.tp)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
