"""The vLLM plugin against the Hugging Face path: same selector, keep and positions -> same greedy tokens
and log-probabilities, for a batch of prompts of different lengths and image sizes (issue: AutoSelect in
vLLM). Runs in vLLM's own environment (`make test-vllm`); the references come from the main environment
(AUTOSELECT_HF_PYTHON, default .venv/bin/python), where transformers >= 5.24 runs `autoselect.apply`.

Each engine runs in its own process (`engine.py`): vLLM keeps process-wide state between engines.
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
HF_PYTHON = os.environ.get("AUTOSELECT_HF_PYTHON", os.path.join(ROOT, ".venv", "bin", "python"))
LOGPROB_ATOL = 2e-3  # fp32 on both sides; vLLM's kernels differ from torch's in summation order

pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("vllm-reference"))
    done = subprocess.run([HF_PYTHON, os.path.join(HERE, "reference.py"), out], capture_output=True, text=True)
    assert done.returncode == 0, f"reference.py failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    with open(os.path.join(out, "reference.json")) as handle:
        return out, {c["name"]: c for c in json.load(handle)["cases"]}


def run_engine(reference_dir, case, tp=1, env=None):
    command = [sys.executable, os.path.join(HERE, "engine.py"), reference_dir, case, "--tp", str(tp)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"engine.py {case} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def assert_same(got, expected, what):
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g["prompt_len"] == e["prompt_len"], f"{what} prompt {i}: vLLM prompt length {g['prompt_len']}, HF {e['prompt_len']}"
        assert g["tokens"] == e["tokens"], f"{what} prompt {i}: vLLM {g['tokens']} != HF {e['tokens']}"
        diff = max(abs(a - b) for a, b in zip(g["logprobs"], e["logprobs"]))
        assert diff <= LOGPROB_ATOL, f"{what} prompt {i}: log-probabilities differ by {diff:.2e}"


def differs(got, expected):
    """Whether two runs can be told apart: other tokens, or log-probabilities beyond the tolerance."""
    for g, e in zip(got, expected):
        if g["tokens"] != e["tokens"]:
            return True
        if max(abs(a - b) for a, b in zip(g["logprobs"], e["logprobs"])) > 10 * LOGPROB_ATOL:
            return True
    return False


CASES = ["llava-autoselect-16", "llava-divprune-frac", "llava-random-16", "llava-unpruned",
         "llava_next-norm-frac", "qwen2_vl-autoselect-frac", "qwen2_vl-norm-5", "qwen2_5_vl-autoselect-7"]


@pytest.mark.parametrize("name", CASES)
def test_vllm_equals_hugging_face(reference, name):
    reference_dir, cases = reference
    case = cases[name]
    got = run_engine(reference_dir, name)
    assert_same(got, case["hf"], name)
    if case["method"] is not None:  # pruning happened: shorter prompts than the unpruned model's
        unpruned = cases[f"{case['family']}-unpruned"]["hf"] if case["family"] == "llava" else None
        if unpruned is not None:
            assert all(g["prompt_len"] < u["prompt_len"] for g, u in zip(got, unpruned))
    if "hf_other_positions" in case:  # the comparison tells compact from original positions
        assert differs(case["hf_other_positions"], case["hf"]), f"{name}: positions do not change the output"
    # the prompts differ in length and image size, and not every prompt gets the same answer
    assert len({g["prompt_len"] for g in got}) > 1 or case["family"] == "llava"  # LLaVA-1.5: one image size
    assert len({tuple(g["tokens"]) for g in got}) > 1


def test_tensor_parallel_2_gives_the_same_output(reference):
    reference_dir, cases = reference
    got = run_engine(reference_dir, "llava-autoselect-16", tp=2, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    assert_same(got, cases["llava-autoselect-16"]["hf"], "tensor parallel 2")


BAD = [
    ({"method": "autoselect", "keep": 16, "selector": "/nonexistent/selector"}, None, "does not exist"),
    ({"method": "autoselect", "keep": 16, "selector": "{dir}/selector-wrong-width"}, None, "width 48"),
    ({"method": "tome", "keep": 16}, None, "unknown method 'tome'"),
    ({"method": "fastv", "keep": 16}, None, "cannot work inside vLLM"),
    ({"method": "norm", "keep": 0}, None, "keep must be >= 1"),
    ({"method": "autoselect", "keep": 16}, None, "needs a selector"),
    (None, {"AUTOSELECT_METHOD": "norm", "AUTOSELECT_KEEP": "1.5"}, "(0, 1]"),
]


def test_bad_configuration_fails_at_engine_start(reference):
    reference_dir, _ = reference
    script = os.path.join(HERE, "bad_config.py")
    for settings, env, message in BAD:
        if settings is not None and "selector" in settings:
            settings = dict(settings, selector=settings["selector"].format(dir=reference_dir))
        command = [sys.executable, script, os.path.join(reference_dir, "llava"), json.dumps(settings)]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)
        lines = [line for line in done.stdout.splitlines() if line.startswith("ERROR ")]
        assert lines, f"{settings or env}: the engine started\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}"
        kind, text = json.loads(lines[-1][len("ERROR "):])
        assert kind == "ValueError" and message in text and "autoselect vLLM plugin" in text, (settings, env, text)
