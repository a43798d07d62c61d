"""No op reads device values back to the host on its hot path (DESIGN.md section 2).

A host read stalls the launch queue on a GPU and breaks CUDA-graph capture of a pruned prefill. The
counter below sees every way Python or an aten op can read data back: Tensor.item / bool / float /
int (all `aten::_local_scalar_dense`), `.tolist()`, and the ops whose output size depends on the data
(`nonzero`, which boolean-mask indexing and `masked_select` run, `unique`; `repeat_interleave`
without an output size reads its total through `_local_scalar_dense`). The value checks use device-side asserts instead (`torch._assert_async`,
which on the CPU reads its flag inside the assert: those reads are not counted, on a GPU they do not
happen). On the CPU a bad value still raises at once with a message that names the problem.
"""

import contextlib
import os
import subprocess
import sys

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import autoselect
from autoselect import force_backend

DATA_DEPENDENT = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::masked_select",
                  "aten::unique", "aten::_unique", "aten::_unique2", "aten::unique_consecutive",
                  "aten::unique_dim"}
DEVICE_ASSERT = {"aten::_assert_async"}


@contextlib.contextmanager
def count_host_reads():
    """Yields a list that, after the block, holds one entry per host read seen inside it."""
    reads = []
    original_tolist = torch.Tensor.tolist

    def tolist(self, *args, **kwargs):
        reads.append("Tensor.tolist")
        return original_tolist(self, *args, **kwargs)

    torch.Tensor.tolist = tolist
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            yield reads
    finally:
        torch.Tensor.tolist = original_tolist
    for event in prof.events():
        if event.name not in DATA_DEPENDENT:
            continue
        parent, inside_assert = event.cpu_parent, False
        while parent is not None:
            inside_assert |= parent.name in DEVICE_ASSERT
            parent = parent.cpu_parent
        if not inside_assert:
            reads.append(event.name)


@pytest.fixture(autouse=True)
def no_debug_checks(monkeypatch):
    monkeypatch.delenv("AUTOSELECT_DEBUG_CHECKS", raising=False)


def test_counter_sees_each_kind_of_host_read():
    """The counter itself: each way of reading a value back is seen, a device assert is not."""
    t = torch.tensor([0.5, -1.0, 2.0])
    reads_of = {
        "item": lambda: t[0].item(),
        "bool": lambda: bool((t > 0).all()),
        "float": lambda: float(t[0]),
        "tolist": lambda: t.tolist(),
        "nonzero": lambda: t.nonzero(),
        "mask": lambda: t[t > 0],
        "masked_select": lambda: torch.masked_select(t, t > 0),
        "repeat_interleave": lambda: torch.repeat_interleave(t, torch.tensor([1, 2, 0])),
    }
    for name, read in reads_of.items():
        with count_host_reads() as reads:
            read()
        assert reads, f"{name} was not counted"
    with count_host_reads() as reads:
        torch._assert_async((t < 3).all(), "fine")
        torch.repeat_interleave(t, torch.tensor([1, 2, 0]), output_size=3)  # size known: no read
    assert reads == []


def _noise_gate_inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 33, 24, generator=gen, dtype=dtype)
    alpha = torch.rand(2, 33, generator=gen, dtype=torch.float32)
    return x, alpha, x.float().mean((0, 1)), x.float().std((0, 1))


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_noise_gate_forward_backward_without_host_reads(backend):
    x, alpha, mean, std = _noise_gate_inputs()
    x.requires_grad_(True)
    alpha.requires_grad_(True)
    with force_backend(backend), count_host_reads() as reads:
        z = autoselect.noise_gate(x, alpha, mean, std, seed=3, offset=1)
        z.backward(torch.ones_like(z))
    assert reads == []
    assert alpha.grad is not None and x.grad is not None


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_select_topk_without_host_reads(backend):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 50, 16, generator=gen, requires_grad=True)
    scores = torch.randn(3, 50, generator=gen)
    ragged = [torch.randn(n, 16, generator=gen) for n in (7, 30)]
    ragged_scores = [torch.randn(n, generator=gen) for n in (7, 30)]
    with force_backend(backend), count_host_reads() as reads:
        kept, index = autoselect.select_topk(x, scores, 9)
        kept.sum().backward()
        autoselect.select_topk(ragged, ragged_scores, [3, 0.5])
    assert reads == []
    assert int(x.grad.sum()) == 3 * 9 * 16  # the gradient reached the kept rows


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_score_select_without_host_reads(backend):
    gen = torch.Generator().manual_seed(2)
    scorer = autoselect.Scorer(40, layers=0, hidden=16)
    x = torch.randn(2, 64, 40, generator=gen)
    with force_backend(backend), count_host_reads() as reads:
        scorer.select(x, 8)  # the first call folds the weights
        kept, index, scores = scorer.select(x, 8, return_scores=True)
        scorer.select([x[0, :20], x[1]], [4, 0.25])
    assert reads == []
    torch.testing.assert_close(scores, scorer(x).float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["logistic", "laplace"])
def test_soft_topk_forward_backward_without_host_reads(kind):
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(4, 100, generator=gen, requires_grad=True)
    with count_host_reads() as reads:
        alpha = autoselect.soft_topk(scores, 10, 0.5, kind=kind)
        alpha_t = autoselect.soft_topk(scores, torch.tensor([5.0, 10.0, 20.0, 2.5]), 0.5, kind=kind)
        (alpha * torch.arange(100.0) + alpha_t).sum().backward()
    assert reads == []
    torch.testing.assert_close(alpha.sum(-1), torch.full((4, ), 10.0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("call,match", [
    (lambda: autoselect.noise_gate(*_bad_alpha(float("nan")), seed=0), r"alpha must lie in \[0, 1\] with no NaN"),
    (lambda: autoselect.noise_gate(*_bad_alpha(1.5), seed=0), r"alpha must lie in \[0, 1\]"),
    (lambda: autoselect.select_topk(torch.randn(1, 5, 2), torch.tensor([[0, 1, float("inf"), 2, 3.]]), 2),
     "select_topk: scores must be finite"),
    (lambda: autoselect.soft_topk(torch.tensor([[0, float("nan"), 1.0]]), 1, 1.0), "soft_topk: scores must be finite"),
    (lambda: autoselect.soft_topk(torch.zeros(2, 4), torch.tensor([1.0, 5.0]), 1.0), r"k must lie in \(0, N\]"),
    (lambda: autoselect.Scorer(4, layers=0, hidden=3).select(torch.tensor([[[1.0, 2, 3, float("nan")]] * 3]), 1),
     "score_select: scores must be finite"),
])
@pytest.mark.parametrize("debug", [False, True])
def test_bad_values_still_raise_on_the_cpu(call, match, debug, monkeypatch):
    if debug:
        monkeypatch.setenv("AUTOSELECT_DEBUG_CHECKS", "1")
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert ("AUTOSELECT_DEBUG_CHECKS=1" in str(info.value)) != debug  # the hint, or the details


def _bad_alpha(value):
    x, alpha, mean, std = _noise_gate_inputs()
    alpha[1, 5] = value
    return x, alpha, mean, std


def test_debug_checks_name_the_first_bad_value(monkeypatch):
    monkeypatch.setenv("AUTOSELECT_DEBUG_CHECKS", "1")
    scores = torch.zeros(2, 10)
    scores[1, 3] = float("nan")
    with pytest.raises(ValueError, match="1 NaN or inf value.*flat position 13"):
        autoselect.select_topk(torch.randn(2, 10, 3), scores, 2)
    with pytest.raises(ValueError, match=r"1 value\(s\) outside, e.g. \[1.5\]"):
        autoselect.noise_gate(*_bad_alpha(1.5), seed=0)


def test_score_select_compiles_fullgraph():
    """Scorer.select traces with torch.compile(fullgraph=True), with and without autograd enabled,
    and gives the eager answer; a parameter update reaches the compiled call."""
    gen = torch.Generator().manual_seed(4)
    scorer = autoselect.Scorer(32, layers=0, hidden=8)
    x = torch.randn(2, 40, 32, generator=gen)

    def select(tokens):
        return scorer.select(tokens, 6, return_scores=True)

    compiled = torch.compile(select, fullgraph=True, backend="aot_eager")
    expected = select(x)
    for result in (compiled(x), _no_grad(compiled, x)):
        torch.testing.assert_close(result[2], expected[2])
        assert torch.equal(result[1], expected[1])
        torch.testing.assert_close(result[0], expected[0])
    with torch.no_grad():
        scorer.fc2.weight.neg_()
    assert torch.equal(compiled(x)[1], select(x)[1])
    assert not torch.equal(compiled(x)[1], expected[1])


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


GPU_BAD_VALUES = {
    "noise_gate": "x = torch.randn(2, 8, 16, device='cuda'); a = torch.full((2, 8), 1.5, device='cuda')\n"
                  "out = autoselect.noise_gate(x, a, x.new_zeros(16), x.new_ones(16), seed=0)",
    # a NaN score in the second image's last token: the kernel's finite flag, then one device assert
    "select_topk": "x = torch.randn(2, 577, 16, device='cuda'); s = torch.randn(2, 577, device='cuda')\n"
                   "s[1, 576] = float('nan')\nout = autoselect.select_topk(x, s, 64)",
    "score_select": "x = torch.randn(2, 577, 16, device='cuda'); x[0, 3, 5] = float('inf')\n"
                    "out = autoselect.Scorer(16, layers=0, hidden=8).cuda().select(x, 64)",
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("op", sorted(GPU_BAD_VALUES))
def test_gpu_bad_values_fail_no_later_than_the_next_sync(op):
    """On a GPU the check is a device assert queued without a host read: it fails the process no later
    than the next synchronisation, never returning the tokens as if they were valid (in a subprocess: a
    device-side assert ends the CUDA context). Where it surfaces is CUDA's choice: a later kernel launch
    of the same call may already report it (seen on an H100), or the synchronise."""
    code = ("import torch, autoselect\n"
            "try:\n"
            + "".join(f"    {line}\n" for line in GPU_BAD_VALUES[op].splitlines()) +
            "    print('returned', flush=True)\n"
            "    torch.cuda.synchronize()\n"
            "    print('synchronised', flush=True)\n"
            "except RuntimeError as error:\n"
            "    print('raised:', error, flush=True)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "AUTOSELECT_DEBUG_CHECKS": "0"})
    assert "synchronised" not in result.stdout, result.stdout
    assert "raised:" in result.stdout and "device-side assert" in result.stdout, (result.stdout, result.stderr)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_ops_without_host_reads():
    """The CUDA kernels: no host read in forward and backward of every op (on valid input)."""
    x, alpha, mean, std = (t.cuda() for t in _noise_gate_inputs())
    alpha.requires_grad_(True)
    scorer = autoselect.Scorer(24, layers=0, hidden=16).cuda()
    torch.cuda.synchronize()
    with count_host_reads() as reads:
        autoselect.noise_gate(x, alpha, mean, std, seed=1).sum().backward()
        autoselect.select_topk(x, alpha.detach(), 5)
        scorer.select(x, 5)
        autoselect.soft_topk(alpha.detach(), 4, 0.3)
    assert reads == []


@pytest.mark.parametrize("options", [{}, {"noise_stats": "running", "soft_topk": "logistic"}],
                         ids=["defaults", "first-release"])
def test_selector_training_step_without_host_reads(options):
    """AutoSelector.gate (Scorer -> soft top-K -> noise gate -> Denoiser) and its backward."""
    selector = autoselect.AutoSelector(24, scorer_hidden=16, denoiser=dict(heads=2, head_dim=8, memory_slots=4),
                                       keep=5, **options)
    x = torch.randn(2, 20, 24, generator=torch.Generator().manual_seed(5))
    selector.update_statistics(x)
    with count_host_reads() as reads:
        vhat, alpha, scores = selector.gate(x, temperature=0.5, seed=1)
        vhat.square().sum().backward()
    assert reads == []
    with pytest.raises(ValueError, match="statistics are empty"):
        autoselect.AutoSelector(24, scorer_hidden=16, keep=5, noise_stats="running").gate(x, temperature=0.5, seed=1)
