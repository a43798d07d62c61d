"""The Denoiser module (DESIGN.md 1.4): identity at start, no leakage, gradients, torch.compile."""

import math

import pytest
import torch

from autoselect import Denoiser, force_backend
from autoselect.modules.denoiser import ALPHA_CLAMP
from conftest import backend_cases

CASES = backend_cases("diag_attention")


def make_denoiser(dim=12, heads=2, head_dim=8, memory_slots=5, dtype=torch.float32, trained=True, seed=0):
    """A small Denoiser; with trained=True every parameter (the zero-initialised ones too) is random,
    so that each path of the block carries signal."""
    torch.manual_seed(seed)
    module = Denoiser(dim, heads=heads, head_dim=head_dim, memory_slots=memory_slots, cond_dim=8).to(dtype)
    if trained:
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.3))
    return module


def make_tokens(B=2, N=6, D=12, dtype=torch.float32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(B, N, D, generator=generator).to(dtype)
    alpha = torch.rand(B, N, generator=generator).to(dtype)
    return z, alpha


def test_identity_at_initialisation():
    module = Denoiser(16, heads=2, head_dim=8, memory_slots=4)
    for B, N in ((2, 7), (1, 1), (3, 577)):
        z, alpha = make_tokens(B, N, 16, seed=B + N)
        alpha[0, 0] = 0.0
        alpha[-1, -1] = 1.0
        assert torch.equal(module(z, alpha), z)


def test_default_configuration():
    module = Denoiser(32)
    assert (module.heads, module.head_dim, module.memory_slots, module.mlp_ratio) == (8, 64, 64, 2)
    assert module.memory_k.shape == module.memory_v.shape == (8, 64, 64)
    assert module.to_q.out_features == 8 * 64 and module.mlp[0].out_features == 64
    assert Denoiser(**module.config()).config() == module.config()
    z, alpha = make_tokens(2, 5, 32)
    assert torch.equal(module(z, alpha), z)


def test_identity_at_initialisation_still_learns():
    """At start the output projections get a gradient, so the identity is not a fixed point."""
    module = Denoiser(16, heads=2, head_dim=8, memory_slots=4)
    z, alpha = make_tokens(2, 5, 16)
    (module(z, alpha) * torch.randn(2, 5, 16)).sum().backward()
    assert module.proj.weight.grad.abs().sum() > 0 and module.mlp[-1].weight.grad.abs().sum() > 0


def test_self_bias_formula_and_clamp():
    module = make_denoiser()
    alpha = torch.tensor([[0.0, 1e-9, 0.25, 0.5, 1 - 1e-9, 1.0]])
    bias = module.self_bias(alpha)
    clamped = alpha.clamp(ALPHA_CLAMP, 1 - ALPHA_CLAMP).double()  # the clamp in float32, like the module
    logit = torch.log(clamped / (1 - clamped))
    expected = module.self_bias_scale.double() * logit.unsqueeze(-1) + module.self_bias_shift.double()
    assert bias.shape == (1, 6, 2) and torch.isfinite(bias).all()
    torch.testing.assert_close(bias.double(), expected, rtol=1e-5, atol=1e-4)
    assert abs(logit[0, 0].item() + math.log(1 / ALPHA_CLAMP - 1)) < 1e-4  # alpha = 0: logit(1e-6)


def test_forward_uses_diag_attention_as_specified():
    """Recomputing the block by hand, with diag_attention's reference, gives the module's output."""
    from autoselect import diag_attention_ref

    module = make_denoiser(dtype=torch.float64)
    z, alpha = make_tokens(dtype=torch.float64)
    B, N, D = z.shape
    feats = torch.stack((alpha, torch.logit(alpha, eps=ALPHA_CLAMP)), -1)
    shift1, scale1, shift2, scale2 = module.modulation(module.condition(feats)).chunk(4, -1)
    h = torch.nn.functional.layer_norm(z, (D, )) * (1 + scale1) + shift1
    q, k, v = (layer(h).view(B, N, 2, 8) for layer in (module.to_q, module.to_k, module.to_v))
    att = diag_attention_ref(q, k, v, module.memory_k, module.memory_v, module.self_bias(alpha))
    mid = z + module.proj(att.reshape(B, N, 16))
    expected = mid + module.mlp(torch.nn.functional.layer_norm(mid, (D, )) * (1 + scale2) + shift2)
    torch.testing.assert_close(module(z, alpha), expected)


@pytest.mark.parametrize("device,backend", CASES)
def test_no_leakage_between_tokens(device, backend):
    """Perturbing token j (its content and its alpha) changes output token j and no other."""
    module = make_denoiser().to(device)
    z, alpha = make_tokens()
    z, alpha = z.to(device), alpha.to(device)
    with force_backend(backend), torch.no_grad():
        base = module(z, alpha)
        b, j = 1, 2
        z2, alpha2 = z.clone(), alpha.clone()
        z2[b, j] += 1.0
        alpha2[b, j] = 1.0 - alpha2[b, j]
        out = module(z2, alpha2)
    changed = (out != base).any(-1)
    expected = torch.zeros_like(changed)
    expected[b, j] = True
    assert torch.equal(changed, expected), changed


def test_no_leakage_in_gradients():
    """The Jacobian of output token i with respect to input token j != i is exactly zero."""
    module = make_denoiser()
    z, alpha = make_tokens(1, 4, 12)
    z.requires_grad_(True)
    alpha.requires_grad_(True)
    out = module(z, alpha)
    for i in range(4):
        gz, ga = torch.autograd.grad(out[0, i].sum(), (z, alpha), retain_graph=True)
        others = [j for j in range(4) if j != i]
        assert torch.all(gz[0, others] == 0) and torch.all(ga[0, others] == 0)
        assert gz[0, i].abs().sum() > 0 and ga[0, i].abs() > 0


def test_gradcheck_float64():
    """Inputs z and alpha, and the attention-specific parameters, through gradcheck."""
    module = make_denoiser(dim=6, heads=2, head_dim=4, memory_slots=3, dtype=torch.float64)
    z, alpha = make_tokens(2, 3, 6, dtype=torch.float64)
    alpha = 0.05 + 0.9 * alpha
    names = ["memory_k", "memory_v", "self_bias_scale", "self_bias_shift", "to_q.weight", "proj.weight"]
    params = dict(module.named_parameters())

    def fn(z, alpha, *chosen):
        return torch.func.functional_call(module, {**params, **dict(zip(names, chosen))}, (z, alpha))

    inputs = [z.requires_grad_(True), alpha.requires_grad_(True)]
    inputs += [params[n].detach().clone().requires_grad_(True) for n in names]
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("device,backend", CASES)
def test_backends_agree(device, backend):
    """The module through the chosen backend against the reference backend, output and gradients."""
    results = []
    for run_backend in ("reference", backend):
        module = make_denoiser().to(device)
        z, alpha = (t.to(device).requires_grad_(True) for t in make_tokens(2, 9, 12))
        with force_backend(run_backend):
            out = module(z, alpha)
            out.square().sum().backward()
        results.append([out, z.grad, alpha.grad, module.memory_k.grad, module.self_bias_scale.grad])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("endpoint", [0.0, 1.0])
def test_alpha_endpoints_finite(endpoint):
    module = make_denoiser()
    z, _ = make_tokens()
    alpha = torch.full((2, 6), endpoint, requires_grad=True)
    z.requires_grad_(True)
    out = module(z, alpha)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(z.grad).all() and torch.isfinite(alpha.grad).all()


def test_torch_compile_fullgraph():
    """torch.compile(fullgraph=True) through the module (forward and backward): no graph break, same
    result as eager."""
    module = make_denoiser()
    z, alpha = make_tokens()

    def step(z, alpha):
        return module(z, alpha.sigmoid()).square().mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        module.zero_grad()
        z_, alpha_ = z.clone().requires_grad_(True), alpha.clone().requires_grad_(True)
        loss = fn(z_, alpha_)
        loss.backward()
        results.append((loss, z_.grad, alpha_.grad, module.memory_v.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_module_calls_diag_attention_op():
    """The block's attention is the registered op (the fused kernel on a GPU), seen in the trace."""
    from torch.fx.experimental.proxy_tensor import make_fx

    module = make_denoiser()
    z, alpha = make_tokens()

    graph = make_fx(lambda z, a: module(z, a))(z, alpha)
    targets = {str(node.target) for node in graph.graph.nodes}
    assert "autoselect.diag_attention.default" in targets, targets


@pytest.mark.parametrize("args,error,match", [
    (dict(z=torch.randn(6, 12)), ValueError, r"z of shape \(B, N, 12\)"),
    (dict(z=torch.randn(2, 6, 10)), ValueError, r"z of shape \(B, N, 12\)"),
    (dict(alpha=torch.rand(2, 5)), ValueError, r"alpha must have shape \(B, N\) = \(2, 6\)"),
    (dict(alpha=torch.rand(2, 6, 1)), ValueError, "alpha must have shape"),
    (dict(alpha=torch.ones(2, 6, dtype=torch.int64)), TypeError, "floating-point"),
])
def test_bad_input(args, error, match):
    module = make_denoiser()
    z, alpha = make_tokens()
    kwargs = {"z": z, "alpha": alpha, **args}
    with pytest.raises(error, match=match):
        module(kwargs["z"], kwargs["alpha"])


@pytest.mark.parametrize("kwargs", [dict(heads=0), dict(memory_slots=-1), dict(head_dim=2.5), dict(dim=True)])
def test_bad_configuration(kwargs):
    with pytest.raises(ValueError, match=r"must be an int >= [01]"):
        Denoiser(**{"dim": 8, **kwargs})


@pytest.mark.parametrize("variant", [dict(memory_slots=0), dict(memory_slots=0, attention="global")])
def test_variants_start_as_identity_and_train(variant):
    torch.manual_seed(0)
    module = Denoiser(24, heads=2, head_dim=8, **variant)
    assert not hasattr(module, "memory_k")
    z, alpha = torch.randn(2, 9, 24), torch.rand(2, 9)
    torch.testing.assert_close(module(z, alpha), z)
    for layer in (module.modulation, module.proj, module.mlp[-1]):
        torch.nn.init.normal_(layer.weight, std=0.1)
    module(z, alpha).square().sum().backward()
    assert module.to_v.weight.grad.abs().sum() > 0


def test_identity_block_and_global_attention_leak_as_designed():
    """memory_slots=0 (the PAPER identity mask) keeps tokens apart, as the memory variant does;
    attention="global" lets a change of token j reach token i (the leaking ablation)."""
    z, alpha = torch.randn(1, 8, 24), torch.rand(1, 8)
    changed = z.clone()
    changed[0, 5] += torch.randn(24)  # not a constant shift, which the LayerNorm removes
    for variant, leaks in ((dict(memory_slots=0), False), (dict(memory_slots=4), False),
                           (dict(memory_slots=0, attention="global"), True)):
        torch.manual_seed(0)
        module = Denoiser(24, heads=2, head_dim=8, **variant)
        for layer in (module.modulation, module.proj, module.mlp[-1]):
            torch.nn.init.normal_(layer.weight, std=0.1)
        with torch.no_grad():
            moved = (module(changed, alpha) - module(z, alpha))[0, torch.arange(8) != 5].abs().max()
        assert (moved > 1e-4) == leaks, variant
    with pytest.raises(ValueError, match="no memory"):
        Denoiser(24, attention="global")
    with pytest.raises(ValueError, match="'diagonal' or 'global'"):
        Denoiser(24, attention="sparse")
