"""Diagonal attention on every backend against its reference (DESIGN.md 1.4, 2 and 7)."""

import math

import pytest
import torch

from autoselect import diag_attention, diag_attention_ref, force_backend
from autoselect.ops import diag_attention_backward_ref
from conftest import backend_cases

CASES = backend_cases("diag_attention")
# (B, N, H, d, M): head dims 32, 64, 128 and an odd one (40); a single token; N = 577 (odd, several
# token blocks); M = 1, M not a power of two, M = 256 (several memory blocks).
SHAPES = [(2, 5, 2, 32, 7), (1, 1, 1, 64, 1), (1, 577, 1, 32, 1), (2, 3, 2, 128, 256), (1, 70, 2, 40, 100),
          (3, 17, 3, 64, 64)]
NAMES = ("q", "k", "v", "mem_k", "mem_v", "self_bias")


def make_inputs(shape, dtype, device, seed=0):
    B, N, H, d, M = shape
    generator = torch.Generator().manual_seed(seed)
    randn = lambda *size: torch.randn(*size, generator=generator)  # noqa: E731
    q, k, v = randn(B, N, H, d), randn(B, N, H, d), randn(B, N, H, d)
    mem_k, mem_v = randn(H, M, d), randn(H, M, d)
    self_bias = 2 * randn(B, N, H)
    tensors = [t.to(device=device, dtype=dtype) for t in (q, k, v, mem_k, mem_v)]
    # self_bias is float32 (the op-math dtype) unless the inputs are float64
    return tensors + [self_bias.to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)]


def run_backend(backend, *inputs):
    with force_backend(backend):
        return diag_attention(*inputs)


def forward_backward(fn, inputs, grad, backend=None):
    """(out, six gradients) of fn on leaf copies of inputs."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    with force_backend(backend):
        out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, grad)
    return (out, ) + grads


def naive(q, k, v, mem_k, mem_v, self_bias):
    """The spec of DESIGN.md 1.4 token by token, in float64, independently of diag_attention_ref."""
    B, N, H, d = q.shape
    out = torch.empty(B, N, H, d, dtype=torch.float64)
    for b in range(B):
        for n in range(N):
            for h in range(H):
                qi = q[b, n, h].double()
                logits = [qi @ k[b, n, h].double() / math.sqrt(d) + self_bias[b, n, h].double()]
                logits += [qi @ mem_k[h, j].double() / math.sqrt(d) for j in range(mem_k.shape[1])]
                weights = torch.softmax(torch.stack(logits), 0)
                values = torch.cat((v[b, n, h].double().unsqueeze(0), mem_v[h].double()))
                out[b, n, h] = weights @ values
    return out


# ---------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------

def test_reference_is_the_spec():
    inputs = make_inputs((2, 3, 2, 5, 4), torch.float64, "cpu")
    torch.testing.assert_close(diag_attention_ref(*inputs), naive(*inputs))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("device,backend", CASES)
def test_forward_fp32(device, backend, shape, poison):
    inputs = make_inputs(shape, torch.float32, device)
    poison(device)
    out = run_backend(backend, *inputs)
    assert out.shape == inputs[0].shape and out.dtype == torch.float32
    exact = diag_attention_ref(*(t.double() for t in inputs))
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", CASES)
def test_memory_dominates_and_self_dominates(device, backend):
    """A huge self bias returns v; a hugely negative one returns the softmax over the memory only."""
    q, k, v, mem_k, mem_v, _ = make_inputs((2, 6, 2, 32, 5), torch.float32, device, seed=1)
    out = run_backend(backend, q, k, v, mem_k, mem_v, torch.full((2, 6, 2), 1e4, device=device))
    torch.testing.assert_close(out, v, rtol=1e-6, atol=1e-6)
    out = run_backend(backend, q, k, v, mem_k, mem_v, torch.full((2, 6, 2), -1e4, device=device))
    weights = torch.softmax(torch.einsum("bnhd,hmd->bnhm", q, mem_k) / math.sqrt(32), -1)
    torch.testing.assert_close(out, torch.einsum("bnhm,hmd->bnhd", weights, mem_v), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("device,backend", CASES)
def test_gradients_fp32(device, backend, shape, poison):
    """Output and all six gradients against autograd through the float64 reference."""
    inputs = make_inputs(shape, torch.float32, device, seed=2)
    grad = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(3)).to(device)
    poison(device)
    ours = forward_backward(diag_attention, inputs, grad, backend)
    exact = forward_backward(diag_attention_ref, [t.double() for t in inputs], grad.double())
    for name, a, b in zip(("out", ) + NAMES, ours, exact):
        assert a.dtype == (torch.float32), name
        scale = max(1.0, b.abs().max().item())  # the memory gradients are sums over every token
        torch.testing.assert_close(a.double() / scale, b / scale, rtol=1e-5, atol=2e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device,backend", CASES)
def test_low_precision_error_rule(device, backend, dtype, poison):
    """Output and all six gradients: error against the float64 reference at most 2x PyTorch's own
    error at that precision (the reference computed in fp16/bf16), plus atol (DESIGN.md 7)."""
    inputs = make_inputs((2, 33, 2, 64, 20), dtype, device, seed=4)
    grad = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(5)).to(device=device, dtype=dtype)
    poison(device)
    ours = forward_backward(diag_attention, inputs, grad, backend)
    exact = forward_backward(diag_attention_ref, [t.double() for t in inputs], grad.double())
    own = forward_backward(lambda *a: diag_attention_ref(*a[:5], a[5].to(dtype), compute_dtype=dtype),
                           inputs, grad)
    assert ours[0].dtype == dtype and ours[4].dtype == dtype and ours[6].dtype == torch.float32
    for name, a, b, c in zip(("out", ) + NAMES, ours, own, exact):
        scale = max(1.0, c.abs().max().item())
        ours_err = (a.double() - c).abs().max().item() / scale
        torch_err = (b.double() - c).abs().max().item() / scale
        assert ours_err <= 2 * torch_err + 1e-3, (name, ours_err, torch_err)


def test_gradcheck_reference_float64():
    inputs = [t.requires_grad_(True) for t in make_inputs((2, 3, 2, 4, 3), torch.float64, "cpu", seed=6)]
    assert torch.autograd.gradcheck(diag_attention_ref, inputs)


@pytest.mark.parametrize("device,backend", CASES)
def test_gradcheck_op_float64(device, backend):
    """The op's own backward (written out, or the Triton kernel) through gradcheck."""
    inputs = [t.requires_grad_(True) for t in make_inputs((1, 3, 2, 4, 3), torch.float64, device, seed=7)]
    with force_backend(backend):
        assert torch.autograd.gradcheck(diag_attention, inputs)


def test_backward_ref_matches_autograd_of_ref():
    inputs = make_inputs((2, 4, 3, 8, 5), torch.float64, "cpu", seed=8)
    grad = torch.randn(2, 4, 3, 8, dtype=torch.float64)
    expected = forward_backward(diag_attention_ref, inputs, grad)[1:]
    _, lse = diag_attention_ref(*inputs, return_lse=True)
    for use_lse in (None, lse):
        for name, a, b in zip(NAMES, diag_attention_backward_ref(grad, *inputs, use_lse), expected):
            torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("device,backend", CASES)
def test_partial_gradients(device, backend):
    """Only the memory and self bias require grad (a frozen projection): those gradients are right and
    the others are None."""
    inputs = make_inputs((2, 9, 2, 32, 6), torch.float32, device, seed=9)
    q, k, v, mem_k, mem_v, self_bias = inputs
    mem_k, mem_v, self_bias = (t.clone().requires_grad_(True) for t in (mem_k, mem_v, self_bias))
    with force_backend(backend):
        diag_attention(q, k, v, mem_k, mem_v, self_bias).square().sum().backward()
    expected = forward_backward(lambda *a: diag_attention_ref(*a).square(), inputs, torch.ones_like(q))
    for t, e in ((mem_k, expected[4]), (mem_v, expected[5]), (self_bias, expected[6])):
        torch.testing.assert_close(t.grad, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device,backend", CASES)
def test_memory_gradients_deterministic(device, backend):
    inputs = make_inputs((2, 200, 2, 32, 40), torch.float32, device, seed=10)
    grad = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(11)).to(device)
    first = forward_backward(diag_attention, inputs, grad, backend)
    second = forward_backward(diag_attention, inputs, grad, backend)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device,backend", CASES)
def test_empty_batch(device, backend):
    inputs = [t.requires_grad_(True) for t in make_inputs((0, 5, 2, 32, 3), torch.float32, device)]
    out = run_backend(backend, *inputs)
    assert out.shape == (0, 5, 2, 32)
    with force_backend(backend):
        out.sum().backward()
    assert torch.equal(inputs[3].grad, torch.zeros(2, 3, 32, device=device))
    assert inputs[5].grad.shape == (0, 5, 2)


# ---------------------------------------------------------------------------------------------------
# No leakage, no logits in memory
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", CASES)
def test_no_leakage_between_tokens(device, backend):
    """Perturbing token j (its q, k, v and self bias) changes output j and no other token."""
    shape = (2, 7, 2, 32, 5)
    inputs = make_inputs(shape, torch.float32, device, seed=12)
    base = run_backend(backend, *inputs)
    b, j = 1, 3
    perturbed = [t.clone() for t in inputs]
    for index in (0, 1, 2, 5):
        perturbed[index][b, j] += 1.0 + torch.rand_like(perturbed[index][b, j])
    out = run_backend(backend, *perturbed)
    changed = (out != base).flatten(2).any(-1)  # (B, N)
    expected = torch.zeros_like(changed)
    expected[b, j] = True
    assert torch.equal(changed, expected), changed


def _allocated_bytes(fn, device):
    """Sizes in bytes of every allocation fn makes on the device (torch's own, inside custom ops too)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn()
    usage = "self_cpu_memory_usage" if device == "cpu" else "self_device_memory_usage"
    return [getattr(e, usage) for e in prof.events() if getattr(e, usage) > 0]


def test_fused_path_allocates_no_logits():
    """Forward and backward through the Triton kernels allocate no tensor of the size of the
    (B, N, H, 1+M) logits or the (B, N, H, M) memory logits; the reference (the control) does."""
    # B*N*H*4 = 512 bytes: every size is a multiple of the CUDA allocator's rounding, and the logit sizes
    # (6 and 5 units) differ from all the others (out: 16 units, lse: 1, memory gradients: 1.25, their
    # partial sums over at most 3 token chunks: 3.75 at most).
    B, N, H, d, M = shape = (2, 32, 2, 16, 5)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # Triton: compiled, or its interpreter
    inputs = [t.requires_grad_(True) for t in make_inputs(shape, torch.float32, device)]
    logit_bytes = {4 * B * N * H * (1 + M), 4 * B * N * H * M}

    def step():
        diag_attention(*inputs).sum().backward()

    for backend, expect_logits in (("triton", False), ("reference", True)):
        with force_backend(backend):
            sizes = _allocated_bytes(step, device)
        assert sizes, backend  # the profiler saw the allocations
        assert bool(logit_bytes & set(sizes)) == expect_logits, (backend, sorted(set(sizes)))


# ---------------------------------------------------------------------------------------------------
# torch.compile, opcheck
# ---------------------------------------------------------------------------------------------------

def test_torch_compile_fullgraph():
    inputs = make_inputs((2, 4, 2, 8, 3), torch.float32, "cpu")

    def step(q, k, v, mem_k, mem_v, self_bias):
        return diag_attention(q * 2, k, v, mem_k, mem_v, self_bias.tanh()).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager = [t.clone().requires_grad_(True) for t in inputs]
    traced = [t.clone().requires_grad_(True) for t in inputs]
    loss_eager, loss_compiled = step(*eager), compiled(*traced)
    loss_eager.backward()
    loss_compiled.backward()
    torch.testing.assert_close(loss_compiled, loss_eager)
    for a, b in zip(traced, eager):
        torch.testing.assert_close(a.grad, b.grad)


def test_opcheck():
    inputs = [t.requires_grad_(True) for t in make_inputs((2, 3, 2, 8, 4), torch.float32, "cpu")]
    torch.library.opcheck(torch.ops.autoselect.diag_attention.default, tuple(inputs))


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------

def _good():
    return dict(zip(NAMES, make_inputs((2, 3, 2, 8, 4), torch.float32, "cpu")))


@pytest.mark.parametrize("change,error,match", [
    (dict(q=torch.randn(2, 3, 16)), ValueError, r"q must have shape \(B, N, H, d\)"),
    (dict(k=torch.randn(2, 3, 2, 4)), ValueError, "k must have the shape of q"),
    (dict(v=torch.randn(2, 4, 2, 8)), ValueError, "v must have the shape of q"),
    (dict(mem_k=torch.randn(3, 4, 8)), ValueError, "mem_k has 3 heads but q has H = 2"),
    (dict(mem_k=torch.randn(2, 4, 16)), ValueError, "mem_k has head dim 16 but q has d = 8"),
    (dict(mem_k=torch.randn(4, 8)), ValueError, r"mem_k must have shape \(H, M, d\)"),
    (dict(mem_k=torch.randn(2, 0, 8), mem_v=torch.randn(2, 0, 8)), ValueError, "M = 0"),
    (dict(mem_v=torch.randn(2, 5, 8)), ValueError, "mem_v must have the shape of mem_k"),
    (dict(self_bias=torch.randn(2, 3)), ValueError, r"self_bias must have shape \(B, N, H\)"),
    (dict(self_bias=torch.randn(2, 3, 3)), ValueError, r"self_bias must have shape \(B, N, H\)"),
    (dict(q=torch.randn(2, 3, 2, 8, dtype=torch.float16)), TypeError, "share one dtype"),
    (dict(mem_v=torch.randn(2, 4, 8, dtype=torch.bfloat16)), TypeError, "share one dtype"),
    (dict(q=torch.ones(2, 3, 2, 8, dtype=torch.int32)), TypeError, "float32"),
    (dict(self_bias=torch.ones(2, 3, 2, dtype=torch.int64)), TypeError, "floating-point"),
    (dict(mem_k=torch.randn(2, 4, 8, device="meta")), ValueError, "one device; q is on cpu, mem_k on meta"),
    (dict(self_bias=torch.randn(2, 3, 2, device="meta")), ValueError, "one device"),
    (dict(v=[[0.0]]), TypeError, "v must be a tensor"),
])
def test_bad_input(change, error, match):
    kwargs = {**_good(), **change}
    with pytest.raises(error, match=match):
        diag_attention(*(kwargs[name] for name in NAMES))


def test_noncontiguous_input_same_as_contiguous():
    inputs = make_inputs((3, 4, 2, 8, 5), torch.float32, "cpu")
    transposed = [t.transpose(0, 1).contiguous().transpose(0, 1) if t.dim() == 4 else t for t in inputs]
    assert not transposed[0].is_contiguous()
    torch.testing.assert_close(diag_attention(*transposed), diag_attention(*inputs))


# ---------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_triton_at_denoiser_shape():
    """On a GPU: the compiled kernel against the reference at B=16, N=576, H=8, d=64, M=64 in bf16
    (error rule, output and gradients), and its forward+backward allocates less than the reference."""
    inputs = make_inputs((16, 576, 8, 64, 64), torch.bfloat16, "cuda", seed=13)
    grad = torch.randn_like(inputs[0])
    ours = forward_backward(diag_attention, inputs, grad, "triton")
    exact = forward_backward(diag_attention_ref, [t.double() for t in inputs], grad.double())
    own = forward_backward(lambda *a: diag_attention_ref(*a[:5], a[5].bfloat16(), compute_dtype=torch.bfloat16),
                           inputs, grad)
    for name, a, b, c in zip(("out", ) + NAMES, ours, own, exact):
        scale = max(1.0, c.abs().max().item())
        ours_err = (a.double() - c).abs().max().item() / scale
        torch_err = (b.double() - c).abs().max().item() / scale
        assert ours_err <= 2 * torch_err + 1e-3, (name, ours_err, torch_err)
    peaks = {}
    for backend, fn in (("triton", diag_attention), ("reference", diag_attention_ref)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        forward_backward(fn, inputs, grad, backend)
        torch.cuda.synchronize()
        peaks[backend] = torch.cuda.max_memory_allocated() - base
    assert peaks["triton"] < peaks["reference"], peaks


def test_kernels_listed_for_ahead_of_time_compilation():
    """tests/test_triton_aot.py compiles every variant listed here for sm_80 and sm_90 (Triton's ptxas):
    the three kernels, in fp32, fp16, bf16 and fp64, at head-dim blocks 32, 64 and 128, with the launch
    options of `launch_config`."""
    from autoselect.triton_kernels import aot, diag_attention as kernels

    assert "diag_attention" in aot.OPS
    specs = kernels.aot_specs()
    names = {kernel.__name__ for kernel, *_ in specs}
    assert names == {"_diag_attention_forward_kernel", "_diag_attention_backward_kernel",
                     "_diag_attention_memory_backward_kernel"}
    assert {signature["q_ptr"] for _, signature, *_ in specs} == {"*fp32", "*fp16", "*bf16", "*fp64"}
    assert {constexprs["BLOCK_D"] for _, _, constexprs, *_ in specs} == {32, 64, 128}
    assert not any(constexprs["DOT_UPCAST"] for _, _, constexprs, *_ in specs)
    for kernel, signature, _, options, hints in specs:  # every argument of the kernel is typed, in order
        assert list(signature) == kernel.arg_names, kernel.__name__
        assert set(options) == {"num_warps", "num_stages"}
        assert set(hints) <= set(signature)


def test_launch_config_serves_head_dims_up_to_the_limit():
    from autoselect.triton_kernels import diag_attention as kernels

    assert kernels.MAX_HEAD_DIM == 128
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for d in (1, 5, 32, 33, 40, 64, 100, 128):
            assert kernels.unsupported(dtype, d) is None
            config = kernels.launch_config(dtype, d)
            assert config.block_d == max(32, 1 << (d - 1).bit_length())
            for name in kernels.KERNELS:
                kernel = getattr(config, name)
                assert kernel.block_t >= 16 and kernel.block_m >= 16  # tl.dot's smallest block
        assert "d = 129 > 128" in kernels.unsupported(dtype, 129)
        with pytest.raises(ValueError, match="head dim d = 256"):
            kernels.launch_config(dtype, 256)


@pytest.mark.parametrize("device,backend", [c for c in CASES if c.values[1] == "triton"])
def test_wide_heads_run_on_the_reference(device, backend):
    """A head dim above the kernels' limit runs on the reference (forward and backward), says so once in a
    warning, and `autoselect.backends()` states the limit."""
    import importlib

    import autoselect

    op = importlib.import_module("autoselect.ops.diag_attention")
    op.KERNELS._warned.clear()
    inputs = [t.requires_grad_(True) for t in make_inputs((1, 3, 2, 160, 4), torch.float32, device, seed=14)]
    with pytest.warns(UserWarning, match="head dim d = 160 > 128.*reference"):
        out = run_backend(backend, *inputs)
    with force_backend(backend):
        out.square().sum().backward()
    expected = forward_backward(lambda *a: diag_attention_ref(*a).square(), inputs, torch.ones_like(out))
    torch.testing.assert_close(out, diag_attention_ref(*inputs))
    for name, t, e in zip(NAMES, inputs, expected[1:]):  # the written-out backward against autograd
        torch.testing.assert_close(t.grad, e, rtol=1e-5, atol=1e-4, msg=name)
    assert "d <= 128" in autoselect.backends(device)["diag_attention"]["limits"]
