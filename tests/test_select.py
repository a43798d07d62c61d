"""select_topk and score_select: every backend against an independent reference (exact, ties
included), ragged batches, gradients, and bad input."""

import pytest
import torch

import autoselect
from autoselect import select_topk, select_topk_ref
from autoselect.ops.select import score_tokens_ref

from conftest import backend_cases


def brute_force_index(scores, k):
    """Ascending indices of the k best by (score descending, index ascending), in plain Python."""
    values = [float(v) + 0.0 for v in scores.float()]
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return sorted(order[:k])


def make(B, N, D, dtype, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g).to(dtype)
    if ties:  # few distinct values: most comparisons are ties
        scores = torch.randint(0, 4, (B, N), generator=g).float()
        scores[scores == 0] = -0.0  # signed zeros must tie with +0.0
    else:
        scores = torch.randn(B, N, generator=g)
    return x, scores


@pytest.mark.parametrize("device, backend", backend_cases("select_topk"))
@pytest.mark.parametrize("B, N, k", [(1, 1, 1), (3, 577, 1), (2, 577, 577), (2, 577, 64), (1, 8192, 2880),
                                     (4, 50, 7)])
@pytest.mark.parametrize("ties", [False, True])
def test_select_topk_matches_reference(device, backend, B, N, k, ties, poison):
    x, scores = make(B, N, 24, torch.float32, seed=N + k, ties=ties)
    x, scores = x.to(device), scores.to(device)
    poison(device)
    with autoselect.force_backend(backend):
        kept, index = select_topk(x, scores, k)
    assert kept.shape == (B, k, 24) and index.shape == (B, k) and index.dtype == torch.int64
    for b in range(B):
        expected = brute_force_index(scores[b].cpu(), k)
        assert index[b].tolist() == expected
        assert torch.equal(kept[b], x[b, expected])
    ref_kept, ref_index = select_topk_ref(x, scores, k)
    assert torch.equal(index, ref_index) and torch.equal(kept, ref_kept)


def test_reference_matches_torch_topk_without_ties():
    x, scores = make(3, 577, 16, torch.float32, seed=1)
    kept, index = select_topk_ref(x, scores, 64)
    expected = torch.topk(scores, 64).indices.sort(-1).values
    assert torch.equal(index, expected)
    assert torch.equal(kept, torch.gather(x, 1, expected.unsqueeze(-1).expand(-1, -1, 16)))


@pytest.mark.parametrize("device, backend", backend_cases("select_topk"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("score_dtype", [torch.float32, torch.bfloat16])
def test_select_topk_dtypes(device, backend, dtype, score_dtype):
    x, scores = make(2, 577, 13, dtype, seed=3, ties=score_dtype == torch.bfloat16)
    scores = scores.to(score_dtype)
    with autoselect.force_backend(backend):
        kept, index = select_topk(x.to(device), scores.to(device), 100)
    assert kept.dtype == dtype
    for b in range(2):
        expected = brute_force_index(scores[b], 100)
        assert index[b].tolist() == expected
        assert torch.equal(kept[b].cpu(), x[b, expected])  # a copy: bit-exact in every dtype


@pytest.mark.parametrize("device, backend", backend_cases("select_topk"))
def test_ragged_batch(device, backend):
    g = torch.Generator().manual_seed(5)
    lengths, budgets = [577, 1, 2880, 40], [64, 1, 0.25, 40]
    xs = [torch.randn(n, 8, generator=g).to(device) for n in lengths]
    ss = [torch.randint(0, 5, (n, ), generator=g).float().to(device) for n in lengths]
    with autoselect.force_backend(backend):
        kept, index = select_topk(xs, ss, budgets)
    assert [len(i) for i in index] == [64, 1, 720, 40]
    for x, s, k, idx, rows in zip(xs, ss, [64, 1, 720, 40], index, kept):
        expected = brute_force_index(s.cpu(), k)
        assert idx.tolist() == expected and torch.equal(rows, x[expected])
    with autoselect.force_backend(backend):  # one budget for all images, as a fraction
        _, index = select_topk(xs, ss, 0.5)
    assert [len(i) for i in index] == [288, 1, 1440, 20]


@pytest.mark.parametrize("device, backend", backend_cases("select_topk"))
def test_kept_is_differentiable_in_x(device, backend):
    x, scores = make(2, 30, 5, torch.float64, seed=7)
    x = x.to(device).requires_grad_(True)
    with autoselect.force_backend(backend):
        kept, index = select_topk(x, scores.to(device), 6)
    grad = torch.randn_like(kept)
    kept.backward(grad)
    expected = torch.zeros_like(x)
    for b in range(2):
        expected[b, index[b]] = grad[b]
    assert torch.equal(x.grad, expected)


def test_select_topk_compiles_without_graph_breaks():
    x, scores = make(2, 40, 8, torch.float32, seed=8)

    def f(x, s):
        kept, index = select_topk(x, s, 5)
        return kept * 2, index

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    kept, index = compiled(x, scores)
    ref_kept, ref_index = f(x, scores)
    assert torch.equal(kept, ref_kept) and torch.equal(index, ref_index)


@pytest.mark.parametrize("k, error, match", [
    (0, ValueError, r"\[1, 10\]"), (11, ValueError, r"\[1, 10\]"), (-3, ValueError, r"\[1, 10\]"),
    (1.5, ValueError, r"\(0, 1\]"), (0.0, ValueError, r"\(0, 1\]"), (float("nan"), ValueError, r"\(0, 1\]"),
    (True, TypeError, "int"), ("4", TypeError, "int"), ([2, 3], TypeError, "ragged"),
])
def test_bad_k(k, error, match):
    x, scores = make(2, 10, 4, torch.float32, seed=0)
    with pytest.raises(error, match=match):
        select_topk(x, scores, k)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scores_are_an_error(bad, monkeypatch):
    x, scores = make(2, 10, 4, torch.float32, seed=0)
    scores[1, 3] = bad
    with pytest.raises(ValueError, match="finite.*AUTOSELECT_DEBUG_CHECKS"):
        select_topk(x, scores, 3)
    monkeypatch.setenv("AUTOSELECT_DEBUG_CHECKS", "1")
    with pytest.raises(ValueError, match="finite.*flat position 13"):
        select_topk(x, scores, 3)
    with pytest.raises(ValueError, match="finite"):
        select_topk([x[0], x[1]], [scores[0], scores[1]], 3)


def test_bad_shapes_dtypes_devices():
    x, scores = make(2, 10, 4, torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        select_topk(x[0], scores[0], 3)
    with pytest.raises(ValueError, match=r"scores must have shape \(2, 10\)"):
        select_topk(x, scores[:, :9], 3)
    with pytest.raises(TypeError, match="float32, float16"):
        select_topk(x.to(torch.int32), scores, 3)
    with pytest.raises(TypeError, match="floating-point"):
        select_topk(x, scores.long(), 3)
    with pytest.raises(ValueError, match="one device"):
        select_topk(x, scores.to("meta"), 3)
    with pytest.raises(ValueError, match="as many"):
        select_topk([x[0], x[1]], [scores[0]], 3)
    with pytest.raises(ValueError, match="3 entries for 2 images"):
        select_topk([x[0], x[1]], [scores[0], scores[1]], [1, 2, 3])
    with pytest.raises(ValueError, match="share D"):
        select_topk([x[0], x[1, :, :3]], [scores[0], scores[1]], 2)


def test_compiled_kernel_checks_its_inputs():
    """A direct call of the C++ op with inconsistent sizes is a RuntimeError, not a crash."""
    autoselect._ext.extension()
    x, scores = torch.randn(10, 4), torch.randn(10)
    with pytest.raises(RuntimeError, match="lengths add up"):
        torch.ops.autoselect_C.select_topk(x, scores, [4, 4], [1, 1])
    with pytest.raises(RuntimeError, match="keeps k=5"):
        torch.ops.autoselect_C.select_topk(x, scores, [4, 6], [5, 1])


@pytest.mark.parametrize("device, backend", backend_cases("select_topk"))
def test_kernels_flag_a_non_finite_score(device, backend):
    """The kernels' `finite` output, the only thing the op's check reads: true for finite scores, false
    for one NaN, inf or -inf anywhere in a ragged batch (first, middle or last image, first or last
    token), and for a float64 score beyond float32's range (compared in float32, it is inf)."""
    from autoselect.ops.select import SELECT_KERNELS

    lengths, ks = [5, 300, 7], [2, 64, 7]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(sum(lengths), 8, generator=g).to(device)
    scores = torch.randn(sum(lengths), generator=g).to(device)

    def flag(s):
        with autoselect.force_backend(backend):
            kept, index, finite = SELECT_KERNELS.run(x.device, x, s.contiguous(), lengths, ks)
        assert finite.dtype == torch.bool and finite.shape == () and index.shape == (sum(ks), )
        return bool(finite)

    assert flag(scores) and flag(scores.double()) and flag(scores.half())
    for position in (0, 4, 5, 150, 304, 305, 311):
        for bad in (float("nan"), float("inf"), -float("inf")):
            poisoned = scores.clone()
            poisoned[position] = bad
            assert not flag(poisoned), (position, bad)
    beyond = scores.double()
    beyond[200] = 1e300
    assert not flag(beyond)


def test_select_topk_reports_a_float64_score_beyond_float32():
    x, scores = make(1, 10, 4, torch.float32, seed=0)
    scores = scores.double()
    scores[0, 2] = -1e300
    with pytest.raises(ValueError, match="finite.*compared in float32"):
        select_topk(x, scores, 3)


def _autoselect_events(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, {e.name for e in prof.events() if e.name.startswith("autoselect")}


def test_eager_inference_skips_the_op_layer():
    """Without gradients, tracing or a dispatch mode, select_topk and score_select call the kernels
    directly (the custom op's dispatch is host work as long as the kernel on a GPU); with a gradient to
    carry, the op runs (its autograd), and both give the same selection."""
    x, scores = make(2, 50, 8, torch.float32, seed=3)
    (kept, index), events = _autoselect_events(lambda: select_topk(x, scores, 5))
    assert "autoselect::select_topk" not in events and "autoselect_C::select_topk" in events
    ragged = ([x[0], x[1, :20]], [scores[0], scores[1, :20]])
    (ragged_kept, _), events = _autoselect_events(lambda: select_topk(*ragged, 5))
    assert "autoselect::select_topk" not in events and torch.equal(ragged_kept[0], kept[0])
    xg = x.clone().requires_grad_(True)
    (kept_grad, index_grad), events = _autoselect_events(lambda: select_topk(xg, scores, 5))
    assert "autoselect::select_topk" in events
    assert torch.equal(index_grad, index) and torch.equal(kept_grad.detach(), kept)
    kept_grad.sum().backward()
    assert int(xg.grad.sum()) == 2 * 5 * 8
    with torch.no_grad():
        _, events = _autoselect_events(lambda: select_topk(xg, scores, 5))
    assert "autoselect::select_topk" not in events

    scorer = make_scorer(8, 16, seed=3)
    _, events = _autoselect_events(lambda: scorer.select(x, 5))
    assert "autoselect::score_select" not in events and "autoselect_C::score_select" in events


def test_dispatch_modes_see_the_op():
    """Under a Python dispatch mode (a FLOP counter, a tracer) the call goes through the custom op, so the
    mode sees autoselect.select_topk / score_select, as it did before the eager path existed."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x, scores = make(2, 50, 8, torch.float32, seed=3)
    scorer = make_scorer(8, 16, seed=3)
    scorer.select(x, 5)  # folds the weights outside the mode
    with Record() as mode:
        kept, index = select_topk(x, scores, 5)
        scorer.select(x, 5)
    assert "autoselect.select_topk.default" in mode.ops and "autoselect.score_select.default" in mode.ops
    assert torch.equal(index, select_topk_ref(x, scores, 5)[1])


# ------------------------------------------------------------------------------------------------
# score_select: the Scorer's tail fused with the selection
# ------------------------------------------------------------------------------------------------

def make_scorer(D, H, seed):
    torch.manual_seed(seed)
    scorer = autoselect.Scorer(D, layers=0, hidden=H)
    with torch.no_grad():  # a non-trivial LayerNorm affine, so that the folding is exercised
        scorer.norm.weight.uniform_(0.5, 1.5)
        scorer.norm.bias.normal_(0, 0.3)
    return scorer


@pytest.mark.parametrize("device, backend", backend_cases("score_select"))
@pytest.mark.parametrize("B, N, D, k", [(1, 1, 8, 1), (2, 577, 40, 64), (3, 100, 33, 100)])
def test_score_select_matches_scorer_and_selection(device, backend, B, N, D, k):
    scorer = make_scorer(D, 16, seed=N).to(device)
    g = torch.Generator().manual_seed(N)
    x = (torch.randn(B, N, D, generator=g) * 2 + torch.randn(B, N, 1, generator=g) * 3).to(device)
    with autoselect.force_backend(backend):
        kept, index, scores = autoselect.score_select(x, scorer, k, return_scores=True)
    with torch.no_grad():
        expected_scores = scorer(x)
    torch.testing.assert_close(scores, expected_scores, rtol=1e-5, atol=1e-5)
    ref_kept, ref_index = select_topk_ref(x, scores, k)  # the selection is exact for its scores
    assert torch.equal(index, ref_index) and torch.equal(kept, ref_kept)
    assert torch.equal(scorer.select(x, k)[1], index)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_score_select_low_precision_tokens(dtype):
    """Tokens with a large common offset: the folded LayerNorm must still give the module's scores."""
    scorer = make_scorer(64, 32, seed=1)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(2, 200, 64, generator=g) + 20.0).to(dtype)
    kept, index, scores = autoselect.score_select(x, scorer, 16, return_scores=True)
    with torch.no_grad():
        expected = scorer(x.double().float())
    assert (scores - expected).abs().max() < 2e-3 * expected.abs().max()
    assert kept.dtype == dtype and torch.equal(kept, select_topk_ref(x, scores, 16)[0])


@pytest.mark.parametrize("device, backend", backend_cases("score_select"))
def test_score_select_ragged_and_reference_formula(device, backend):
    scorer = make_scorer(16, 8, seed=3).to(device)
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(n, 16, generator=g).to(device) for n in (5, 577, 33)]
    with autoselect.force_backend(backend):
        kept, index, scores = autoselect.score_select(xs, scorer, [2, 0.1, 33], return_scores=True)
    assert [len(i) for i in index] == [2, 58, 33]
    for x, k, idx, rows, s in zip(xs, [2, 58, 33], index, kept, scores):
        with torch.no_grad():
            torch.testing.assert_close(s, scorer(x), rtol=1e-5, atol=1e-5)
        assert idx.tolist() == brute_force_index(s.cpu(), k) and torch.equal(rows, x[idx])
    weight, col_sum, bias, w2, b2, eps = scorer.fused_parameters(torch.float32, xs[1].device)
    ref = score_tokens_ref(xs[1], xs[1] @ weight.T, col_sum, bias, w2, b2, eps)
    torch.testing.assert_close(ref, scores[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device, backend", backend_cases("score_select"))
def test_score_select_kernels_flag_a_non_finite_score(device, backend):
    """The fused kernel's `finite` output: false when one token (here the last of the second image) holds
    a NaN or inf, whose score is then NaN; true otherwise."""
    from autoselect.ops.select import SCORE_SELECT_KERNELS, _first_layer

    scorer = make_scorer(16, 8, seed=6).to(device)
    x = torch.randn(70, 16, generator=torch.Generator().manual_seed(6)).to(device)
    weight, col_sum, bias, w2, b2, eps = scorer.fused_parameters(x.dtype, x.device)

    def flag(tokens):
        with autoselect.force_backend(backend), torch.no_grad():
            hidden = _first_layer(tokens, weight).contiguous()
            out = SCORE_SELECT_KERNELS.run(x.device, tokens, hidden, col_sum, bias, w2, b2, eps, [30, 40], [4, 40])
        assert out[3].dtype == torch.bool and out[3].shape == ()
        return bool(out[3]), out[2]

    finite, scores = flag(x)
    assert finite and bool(torch.isfinite(scores).all())
    for bad in (float("nan"), float("inf")):
        poisoned = x.clone()
        poisoned[69, 3] = bad
        finite, scores = flag(poisoned)
        assert not finite and not bool(torch.isfinite(scores[69]))


def test_score_select_errors():
    scorer = make_scorer(16, 8, seed=3)
    x = torch.randn(2, 10, 16)
    with pytest.raises(ValueError, match="width 16"):
        autoselect.score_select(torch.randn(2, 10, 12), scorer, 3)
    with pytest.raises(ValueError, match=r"\[1, 10\]"):
        autoselect.score_select(x, scorer, 11)
    with pytest.raises(TypeError, match="Scorer"):
        autoselect.score_select(x, torch.nn.Linear(16, 1), 3)
    x[0, 4, 2] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        autoselect.score_select(x, scorer, 3)


def test_fused_parameters_follow_parameter_updates():
    scorer = make_scorer(16, 8, seed=5)
    x = torch.randn(1, 50, 16)
    first = autoselect.score_select(x, scorer, 5, return_scores=True)[2]
    with torch.no_grad():
        scorer.fc2.weight.mul_(-1)
        scorer.fc2.bias.mul_(-1)
    second = autoselect.score_select(x, scorer, 5, return_scores=True)[2]
    torch.testing.assert_close(second, -first, rtol=1e-5, atol=1e-6)
