"""The noise gate on every backend against its reference (DESIGN.md 1.3, 2 and 7)."""

import math

import pytest
import torch

import autoselect
from autoselect import force_backend, gate_noise_ref, noise_gate, noise_gate_ref
from conftest import backend_cases

CASES = backend_cases("noise_gate")
# Shapes: LLaVA-like, odd widths (D not a multiple of 4 or 8), a single token, a single channel.
SHAPES = [(2, 24, 64), (1, 1, 7), (3, 5, 1), (2, 3, 4097), (2, 3, 2052), (37, 13)]


def make_inputs(shape, dtype, device, seed=0, alpha=None):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator) * 2 + 0.5).to(device=device, dtype=dtype)
    D = shape[-1]
    if alpha is None:
        alpha = torch.rand(shape[:-1], generator=generator)
    alpha = alpha.to(device)
    mean = (0.3 * torch.randn(D, generator=generator)).to(device)
    std = (0.5 + torch.rand(D, generator=generator)).to(device)
    noise = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    return x, alpha, mean, std, noise


def run_backend(backend, *args, **kwargs):
    with force_backend(backend):
        return noise_gate(*args, **kwargs)


def formula(x, alpha, mean, std, noise):
    """DESIGN.md 1.3 written out in float64, independently of noise_gate_ref."""
    x, alpha, mean, std, noise = (t.double() for t in (x, alpha, mean, std, noise))
    a = alpha.unsqueeze(-1)
    return mean + a.sqrt() * (x - mean) + (1 - a).sqrt() * std * noise


# ---------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("device,backend", CASES)
def test_formula_fp32_explicit_noise(device, backend, shape, poison):
    x, alpha, mean, std, noise = make_inputs(shape, torch.float32, device)
    poison(device)
    z = run_backend(backend, x, alpha, mean, std, seed=None, noise=noise)
    assert z.shape == x.shape and z.dtype == x.dtype
    torch.testing.assert_close(z.double(), formula(x, alpha, mean, std, noise), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device,backend", CASES)
def test_low_precision_error_rule(device, backend, dtype, poison):
    """Error against the fp32 reference at most 2x PyTorch's own error at that precision, plus atol."""
    x, alpha, mean, std, noise = make_inputs((4, 33, 96), dtype, device, seed=1)
    poison(device)
    z = run_backend(backend, x, alpha, mean, std, seed=None, noise=noise)
    assert z.dtype == dtype
    exact = noise_gate_ref(x.float(), alpha, mean, std, noise=noise.float())
    torch_own = noise_gate_ref(x, alpha.to(dtype), mean.to(dtype), std.to(dtype), noise=noise, compute_dtype=dtype)
    ours_err = (z.float() - exact).abs().max().item()
    torch_err = (torch_own.float() - exact).abs().max().item()
    assert ours_err <= 2 * torch_err + 1e-3, (ours_err, torch_err)


@pytest.mark.parametrize("device,backend", CASES)
def test_seeded_matches_reference_noise(device, backend):
    """The in-kernel noise is the contract's noise: same result as the reference with its noise."""
    for shape in [(2, 9, 64), (3, 7, 5)]:
        x, alpha, mean, std, _ = make_inputs(shape, torch.float32, device, seed=2)
        z = run_backend(backend, x, alpha, mean, std, seed=123456789, offset=77)
        noise = gate_noise_ref(x.numel(), 123456789, 77, device=device).reshape(shape)
        torch.testing.assert_close(z.double(), formula(x, alpha, mean, std, noise), rtol=1e-5, atol=3e-5)


@pytest.mark.parametrize("seed,offset", [(7, (1 << 32) - 5), (123456789, 5 * (1 << 32) + 3),
                                         ((1 << 40) + 11, (1 << 62) + 1)], ids=["across-2^32", "5*2^32", "2^62"])
@pytest.mark.parametrize("device,backend", CASES)
def test_seeded_noise_at_64_bit_offsets(device, backend, seed, offset):
    """Counters at and beyond 2^32 (and seeds beyond 2^32) still give the contract's noise: Philox4x32-10
    on (lo32, hi32, 0, 0) of the 64-bit counter, not another generator. The first case crosses 2^32
    inside the tensor. Both noise layouts of the Triton kernel: D % 4 == 0 and odd D; and the
    backward, which draws the noise again."""
    for shape in [(2, 9, 64), (3, 7, 5)]:
        x, alpha, mean, std, _ = make_inputs(shape, torch.float32, device, seed=2)
        noise = gate_noise_ref(x.numel(), seed, offset, device=device).reshape(shape)
        z = run_backend(backend, x, alpha, mean, std, seed=seed, offset=offset)
        torch.testing.assert_close(z.double(), formula(x, alpha, mean, std, noise), rtol=1e-5, atol=3e-5)
        alpha_ = alpha.clone().requires_grad_(True)
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(device)
        with force_backend(backend):
            noise_gate(x, alpha_, mean, std, seed=seed, offset=offset).backward(grad)
        alpha_ref = alpha.clone().requires_grad_(True)
        noise_gate_ref(x, alpha_ref, mean, std, noise=noise).backward(grad)
        torch.testing.assert_close(alpha_.grad, alpha_ref.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device,backend", CASES)
def test_alpha_endpoints(device, backend):
    """alpha = 1 passes tokens through; alpha = 0 gives mean + std * eps, whatever x is."""
    x, _, mean, std, noise = make_inputs((2, 4, 16), torch.float32, device, seed=3)
    ones = torch.ones(2, 4, device=device)
    torch.testing.assert_close(run_backend(backend, x, ones, mean, std, seed=5), x, rtol=1e-6, atol=1e-6)
    zeros = torch.zeros(2, 4, device=device)
    z = run_backend(backend, x, zeros, mean, std, seed=None, noise=noise)
    torch.testing.assert_close(z, mean + std * noise, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", CASES)
def test_empty_batch(device, backend):
    x, alpha, mean, std, _ = make_inputs((0, 5, 8), torch.float32, device)
    alpha.requires_grad_(True)
    z = run_backend(backend, x, alpha, mean, std, seed=1)
    assert z.shape == (0, 5, 8)
    with force_backend(backend):
        z.sum().backward()
    assert alpha.grad.shape == (0, 5)


# ---------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seeded", [False, True], ids=["noise", "seeded"])
def test_gradcheck_cpp_float64(seeded):
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    alpha = (0.1 + 0.8 * torch.rand(2, 3, dtype=torch.float64, generator=generator)).requires_grad_(True)
    mean = torch.randn(5, dtype=torch.float64, generator=generator)
    std = 0.5 + torch.rand(5, dtype=torch.float64, generator=generator)
    noise = None if seeded else torch.randn(2, 3, 5, dtype=torch.float64, generator=generator)

    def fn(x, alpha):
        return noise_gate(x, alpha, mean, std, seed=11, offset=3, noise=noise)

    with force_backend("cpp"):
        assert torch.autograd.gradcheck(fn, (x, alpha), eps=1e-6, atol=1e-7)


def test_gradcheck_reference_float64():
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    alpha = (0.1 + 0.8 * torch.rand(3, dtype=torch.float64, generator=generator)).requires_grad_(True)
    mean, std = torch.randn(6, dtype=torch.float64), 0.5 + torch.rand(6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, a: noise_gate_ref(x, a, mean, std, seed=2), (x, alpha))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("needs", ["both", "alpha", "x"])
@pytest.mark.parametrize("device,backend", CASES)
def test_backward_matches_reference_autograd(device, backend, needs, dtype):
    for shape in [(2, 10, 64), (3, 4, 7), (1, 3, 2052)]:  # one chunk, odd width, several chunks
        x, alpha, mean, std, _ = make_inputs(shape, dtype, device, seed=6)
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(device=device, dtype=dtype)
        results = []
        for run in (lambda *a: run_backend(backend, *a, seed=99, offset=5),
                    lambda *a: noise_gate_ref(*a, seed=99, offset=5)):
            x_ = x.clone().requires_grad_(needs in ("both", "x"))
            alpha_ = alpha.clone().requires_grad_(needs in ("both", "alpha"))
            with force_backend(backend):
                run(x_, alpha_, mean, std).backward(grad)
            results.append((x_.grad, alpha_.grad))
        (gx, ga), (gx_ref, ga_ref) = results
        tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        if needs in ("both", "x"):
            torch.testing.assert_close(gx.float(), gx_ref.float(), **tol)
        else:
            assert gx is None
        if needs in ("both", "alpha"):
            scale = max(1.0, ga_ref.abs().max().item())
            torch.testing.assert_close(ga / scale, ga_ref / scale, **tol)
        else:
            assert ga is None


@pytest.mark.parametrize("device,backend", CASES)
def test_alpha_extremes_finite(device, backend):
    values = torch.tensor([0.0, 1e-7, 0.5, 1 - 1e-7, 1.0])
    x, alpha, mean, std, _ = make_inputs((1, 5, 12), torch.float32, device, alpha=values.unsqueeze(0))
    x.requires_grad_(True)
    alpha.requires_grad_(True)
    z = run_backend(backend, x, alpha, mean, std, seed=3)
    with force_backend(backend):
        z.backward(torch.ones_like(z))
    for t in (z, x.grad, alpha.grad):
        assert torch.isfinite(t).all()
    # The gradient at the clamped endpoints equals the one computed at the clamp value.
    ref_alpha = values.clone().requires_grad_(True)
    noise_gate_ref(x.detach().cpu(), ref_alpha, mean.cpu(), std.cpu(), seed=3).backward(torch.ones(1, 5, 12))
    torch.testing.assert_close(alpha.grad.cpu(), ref_alpha.grad.unsqueeze(0), rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("device,backend", CASES)
def test_backward_uses_forward_noise(device, backend):
    """The seeded backward regenerates exactly the forward's noise: its gradient equals the one of the
    same call made with that noise passed explicitly (noise read back from the backend itself)."""
    shape = (2, 6, 32)
    x, alpha, mean, std, _ = make_inputs(shape, torch.float32, device, seed=8)
    D = shape[-1]
    # alpha = 0, mean = 0, std = 1 turns the gate into its own noise: z = eps.
    own_noise = run_backend(backend, torch.zeros_like(x), torch.zeros(shape[:-1], device=device),
                            torch.zeros(D, device=device), torch.ones(D, device=device), seed=21, offset=4)
    grads = []
    for kwargs in (dict(seed=21, offset=4), dict(seed=None, noise=own_noise)):
        alpha_ = alpha.clone().requires_grad_(True)
        z = run_backend(backend, x, alpha_, mean, std, **kwargs)
        with force_backend(backend):
            z.backward(torch.ones_like(z))
        grads.append(alpha_.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-6)


def test_nothing_of_input_size_saved_for_backward():
    """Seeded calls keep no tensor of the size of x for backward (only x itself, an input)."""
    x, alpha, mean, std, _ = make_inputs((4, 16, 32), torch.float32, "cpu")
    alpha.requires_grad_(True)
    saved = []
    inputs = {t.untyped_storage().data_ptr() for t in (x, alpha, mean, std)}

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        noise_gate(x, alpha, mean, std, seed=1)
    new = [t for t in saved if t.untyped_storage().data_ptr() not in inputs]
    assert all(t.numel() < x.numel() for t in new), [tuple(t.shape) for t in new]


# ---------------------------------------------------------------------------------------------------
# torch.compile, opcheck
# ---------------------------------------------------------------------------------------------------

def test_torch_compile_fullgraph():
    x, alpha, mean, std, _ = make_inputs((2, 8, 16), torch.float32, "cpu")

    def step(x, alpha):
        return (noise_gate(x * 2, alpha.sigmoid(), mean, std, seed=7) ** 2).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a1 = alpha.clone().requires_grad_(True)
    a2 = alpha.clone().requires_grad_(True)
    loss_eager, loss_compiled = step(x, a1), compiled(x, a2)
    loss_eager.backward()
    loss_compiled.backward()
    torch.testing.assert_close(loss_compiled, loss_eager)
    torch.testing.assert_close(a2.grad, a1.grad)


@pytest.mark.parametrize("explicit_noise", [False, True])
def test_opcheck(explicit_noise):
    x, alpha, mean, std, noise = make_inputs((2, 5, 8), torch.float32, "cpu")
    alpha.requires_grad_(True)
    torch.library.opcheck(torch.ops.autoselect.noise_gate.default,
                          (x, alpha, mean, std, noise if explicit_noise else None, 3, 1))


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------

def _good():
    x, alpha, mean, std, noise = make_inputs((2, 3, 8), torch.float32, "cpu")
    return dict(x=x, alpha=alpha, mean=mean, std=std, noise=None, seed=1)


@pytest.mark.parametrize("change,error,match", [
    (dict(x=torch.randn(8)), ValueError, "shape"),
    (dict(x=torch.randn(1, 2, 3, 8)), ValueError, "shape"),
    (dict(alpha=torch.rand(2, 4)), ValueError, "alpha must have shape"),
    (dict(alpha=torch.rand(3, 2)), ValueError, "alpha must have shape"),
    (dict(mean=torch.zeros(7)), ValueError, "mean must have shape"),
    (dict(std=torch.ones(9)), ValueError, "std must have shape"),
    (dict(alpha=torch.full((2, 3), 1.5)), ValueError, r"\[0, 1\]"),
    (dict(alpha=torch.full((2, 3), -0.1)), ValueError, r"\[0, 1\]"),
    (dict(alpha=torch.tensor([[0.5, float("nan"), 0.5]] * 2)), ValueError, "NaN"),
    (dict(x=torch.ones(2, 3, 8, dtype=torch.int32)), TypeError, "float32"),
    (dict(alpha=torch.ones(2, 3, dtype=torch.int64)), TypeError, "floating"),
    (dict(mean=torch.zeros(8, device="meta")), ValueError, "one device"),
    (dict(seed=None), ValueError, "seed"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=2**63), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(noise=torch.randn(2, 3, 7)), ValueError, "noise must have the shape"),
    (dict(mean=torch.zeros(8, requires_grad=True)), ValueError, "no gradient"),
])
def test_bad_input(change, error, match):
    kwargs = {**_good(), **change}
    x, alpha, mean, std = (kwargs.pop(k) for k in ("x", "alpha", "mean", "std"))
    with pytest.raises(error, match=match):
        noise_gate(x, alpha, mean, std, **kwargs)


def test_compiled_op_checks_its_inputs():
    """A direct call of the C++ op with bad input raises instead of crashing."""
    autoselect._ext.extension()
    x, alpha, mean, std = torch.randn(2, 8), torch.rand(2), torch.zeros(8), torch.ones(8)
    op = torch.ops.autoselect_C.noise_gate_forward
    with pytest.raises(RuntimeError, match="alpha must hold one value per token"):
        op(x, torch.rand(3), mean, std, None, 0, 0)
    with pytest.raises(RuntimeError, match="mean must have shape"):
        op(x, alpha, torch.zeros(7), std, None, 0, 0)
    with pytest.raises(RuntimeError, match="must be Float for x of Float"):
        op(x, alpha.double(), mean, std, None, 0, 0)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(torch.randn(8, 2).t(), alpha, mean, std, None, 0, 0)
    with pytest.raises(RuntimeError, match="non-negative"):
        op(x, alpha, mean, std, None, -1, 0)


def test_noncontiguous_input_same_as_contiguous():
    x, alpha, mean, std, _ = make_inputs((3, 8, 16), torch.float32, "cpu")
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert not xt.is_contiguous()
    torch.testing.assert_close(noise_gate(xt, alpha, mean, std, seed=4), noise_gate(x, alpha, mean, std, seed=4))


def test_noise_offsets():
    assert autoselect.noise_offsets(0) == 0
    assert autoselect.noise_offsets(1) == 1
    assert autoselect.noise_offsets(8) == 2
    assert autoselect.noise_offsets(9) == math.ceil(9 / 4)


def test_backward_ref_matches_autograd_of_ref():
    """The written-out backward reference equals autograd through the forward reference."""
    from autoselect.ops import noise_gate_backward_ref

    values = torch.tensor([0.0, 1e-7, 0.3, 0.5, 1 - 1e-7, 1.0], dtype=torch.float64)
    x, _, mean, std, _ = make_inputs((6, 11), torch.float64, "cpu", alpha=values)
    x.requires_grad_(True)
    alpha = values.clone().requires_grad_(True)
    grad = torch.randn(6, 11, dtype=torch.float64)
    noise_gate_ref(x, alpha, mean, std, seed=8, offset=2).backward(grad)
    gx, ga = noise_gate_backward_ref(grad, x.detach(), values, mean, std, seed=8, offset=2)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(ga, alpha.grad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_backends_agree_at_llava_shape():
    """On a GPU: CUDA, Triton and the reference agree at a LLaVA-1.5 shape in bf16, forward and
    backward, with the noise drawn in the kernels."""
    x, alpha, mean, std, _ = make_inputs((4, 576, 4096), torch.bfloat16, "cuda", seed=9)
    grad = torch.randn_like(x)
    results = {}
    for backend in ("cuda", "triton", "reference"):
        alpha_ = alpha.clone().requires_grad_(True)
        with force_backend(backend):
            z = noise_gate(x, alpha_, mean, std, seed=31, offset=2)
            z.backward(grad)
        results[backend] = (z.float(), alpha_.grad)
    for backend in ("cuda", "triton"):
        torch.testing.assert_close(results[backend][0], results["reference"][0], rtol=2e-2, atol=2e-2)
        scale = results["reference"][1].abs().max().item()
        torch.testing.assert_close(results[backend][1] / scale, results["reference"][1] / scale, rtol=1e-3,
                                   atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_kernels_launch_on_the_tensors_device(backend):
    """x on cuda:1 while cuda:0 is current: the kernels run on cuda:1 (launched under a device guard),
    forward and backward, and give the reference's result."""
    x, alpha, mean, std, _ = make_inputs((2, 40, 64), torch.float32, "cuda:1", seed=10)
    grad = torch.randn_like(x)
    noise = gate_noise_ref(x.numel(), 17, 3, device=x.device).reshape(x.shape)
    alpha_ = alpha.clone().requires_grad_(True)
    with torch.cuda.device(0), force_backend(backend):
        assert torch.cuda.current_device() == 0
        z = noise_gate(x, alpha_, mean, std, seed=17, offset=3)
        z.backward(grad)
    torch.cuda.synchronize(1)
    assert z.device == x.device and alpha_.grad.device == x.device
    alpha_ref = alpha.clone().requires_grad_(True)
    z_ref = noise_gate_ref(x, alpha_ref, mean, std, noise=noise)
    z_ref.backward(grad)
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=3e-5)
    torch.testing.assert_close(alpha_.grad, alpha_ref.grad, rtol=1e-4, atol=1e-4)


def test_zero_width_tokens():
    x, alpha = torch.randn(2, 3, 0), torch.rand(2, 3, requires_grad=True)
    for backend in ("cpp", "reference"):
        z = run_backend(backend, x, alpha, torch.zeros(0), torch.ones(0), seed=1)
        assert z.shape == (2, 3, 0)
        with force_backend(backend):
            z.sum().backward()
        assert torch.equal(alpha.grad, torch.zeros(2, 3))
        alpha.grad = None


def test_value_checks_are_device_asserts_with_a_debug_mode(monkeypatch):
    """The alpha check never reads alpha on the host (a device-side assert, which on the CPU raises at
    once); AUTOSELECT_DEBUG_CHECKS=1 checks on the host and says what was wrong."""
    x, alpha, mean, std, _ = make_inputs((1, 2, 4), torch.float32, "cpu")
    monkeypatch.delenv("AUTOSELECT_DEBUG_CHECKS", raising=False)
    with pytest.raises(ValueError, match=r"\[0, 1\].*AUTOSELECT_DEBUG_CHECKS=1"):
        noise_gate(x, torch.full((1, 2), 1.5), mean, std, seed=1)
    monkeypatch.setenv("AUTOSELECT_DEBUG_CHECKS", "1")
    with pytest.raises(ValueError, match=r"2 value\(s\) outside, e.g. \[1.5, 1.5\]"):
        noise_gate(x, torch.full((1, 2), 1.5), mean, std, seed=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_at_low_precision_has_no_nan_at_alpha_one(dtype):
    """noise_gate_ref(compute_dtype=fp16/bf16), the baseline of the error rule: alpha that rounds to 1
    at that precision gives x itself, not 0 / 0 in the derivative term."""
    x, _, mean, std, _ = make_inputs((2, 3, 8), torch.float32, "cpu")
    alpha = torch.tensor([[1.0, 1 - 1e-7, 0.5], [0.0, 0.9999, 0.3]], requires_grad=True)
    z = noise_gate_ref(x.to(dtype), alpha, mean, std, seed=1, compute_dtype=dtype)
    assert not bool(z.isnan().any())
    torch.testing.assert_close(z[0, 0], x[0, 0].to(dtype), rtol=2e-2, atol=2e-2)  # mean + (x - mean), rounded
    z.float().sum().backward()
    assert bool(torch.isfinite(alpha.grad).all())
