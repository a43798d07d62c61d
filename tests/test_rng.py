"""The RNG contract (DESIGN.md section 2): one noise function on every backend, and good noise."""

import pytest
import torch
from scipy import stats

from autoselect import force_backend, gate_noise_ref, noise_gate
from conftest import backend_cases

CASES = backend_cases("noise_gate")


def backend_noise(backend, numel, seed, offset=0, device="cpu", width=None):
    """The noise a backend draws, read back through the gate: alpha = 0, mean = 0, std = 1 gives eps."""
    width = width or numel
    rows = numel // width
    with force_backend(backend):
        z = noise_gate(torch.zeros(rows, width, device=device), torch.zeros(rows, device=device),
                       torch.zeros(width, device=device), torch.ones(width, device=device), seed=seed, offset=offset)
    return z.reshape(-1)


@pytest.mark.parametrize("device,backend", CASES)
def test_same_seed_same_output(device, backend):
    x = torch.randn(3, 7, 20, device=device)
    alpha = torch.rand(3, 7, device=device)
    mean, std = torch.zeros(20, device=device), torch.ones(20, device=device)
    with force_backend(backend):
        first = noise_gate(x, alpha, mean, std, seed=5, offset=9)
        second = noise_gate(x, alpha, mean, std, seed=5, offset=9)
        other = noise_gate(x, alpha, mean, std, seed=6, offset=9)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("width", [64, 7, 1, 2052])
@pytest.mark.parametrize("device,backend", CASES)
def test_backend_noise_is_contract_noise(device, backend, width):
    """Every backend's noise equals the PyTorch implementation of the contract to float rounding,
    for widths that are and are not multiples of four, with a seed and offset above 2**32."""
    numel = 4 * 3 * 7 * width
    seed, offset = 2**40 + 12345, 2**33 + 3
    ours = backend_noise(backend, numel, seed, offset, device, width).cpu()
    ref = gate_noise_ref(numel, seed, offset)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=2e-5)


def test_cpp_and_triton_noise_agree():
    """The C++ noise and the Triton noise (interpreter without a GPU) agree to float rounding."""
    # A forced backend that cannot run raises with its reason, so a missing interpreter fails here.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    numel = 1 << 14
    cpp = backend_noise("cpp", numel, seed=77, offset=1000, width=256)
    triton = backend_noise("triton", numel, seed=77, offset=1000, device=device, width=256).cpu()
    torch.testing.assert_close(cpp, triton, rtol=1e-5, atol=2e-5)


def test_offset_contract():
    """A call consumes ceil(numel / 4) counters: offset + 1 shifts the stream by four elements."""
    base = backend_noise("cpp", 4096, seed=3, offset=10)
    shifted = backend_noise("cpp", 4092, seed=3, offset=11)
    assert torch.equal(base[4:], shifted)


@pytest.fixture(scope="module")
def draws():
    n = 1 << 21  # 2.1e6 draws
    return backend_noise("cpp", n, seed=2024, width=1024).double()


def test_mean_and_variance(draws):
    n = draws.numel()
    assert abs(draws.mean().item()) < 5 / n**0.5
    assert abs(draws.var().item() - 1) < 5 * (2 / n)**0.5


def test_kolmogorov_smirnov(draws):
    result = stats.kstest(draws.numpy(), "norm")
    assert result.pvalue > 1e-3, result


def test_higher_moments(draws):
    assert abs(stats.skew(draws.numpy())) < 0.02
    assert abs(stats.kurtosis(draws.numpy())) < 0.04


@pytest.mark.parametrize("lag", [1, 2, 3, 4, 5, 1024])
def test_no_correlation_between_neighbours(draws, lag):
    """Within a group of four (lags 1-3), across groups (4, 5) and across rows (1024)."""
    corr = torch.corrcoef(torch.stack((draws[:-lag], draws[lag:])))[0, 1].item()
    assert abs(corr) < 5 / draws.numel()**0.5


def test_no_correlation_between_seeds(draws):
    other = backend_noise("cpp", draws.numel(), seed=2025, width=1024).double()
    neighbour_seed = backend_noise("cpp", draws.numel(), seed=2024 + 2**32, width=1024).double()
    for stream in (other, neighbour_seed):
        corr = torch.corrcoef(torch.stack((draws, stream)))[0, 1].item()
        assert abs(corr) < 5 / draws.numel()**0.5
