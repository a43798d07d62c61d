"""`autoselect info` / `bench` and the backend choice."""

import os
import subprocess
import sys
import tempfile

import pytest
import torch

import autoselect
from autoselect import _backends, force_backend
from autoselect.cli import main


def run_cli(*args, env=None):
    # From outside the source tree, so that the installed package is what runs.
    return subprocess.run([sys.executable, "-m", "autoselect", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=tempfile.gettempdir())


def test_info_shows_cpp_backend_on_cpu():
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"autoselect {autoselect.__version__}" in out
    assert f"torch      {torch.__version__}" in out
    assert "extension  autoselect._C" in out and "C++ CPU kernels" in out
    row = next(line for line in out.splitlines() if line.startswith("noise_gate") and " cpu " in line)
    assert row.split()[2] == "cpp", row
    if not torch.cuda.is_available():
        assert "GPU: none" in out
        assert "cuda: CUDA kernels need a CUDA device" in row
    assert "limits: triton serves head dims d <= 128" in out  # diag_attention's note from backends()


def test_backends_api():
    table = autoselect.backends("cpu")
    assert table["noise_gate"]["chosen"] == "cpp"
    assert {"reference", "cpp"} <= set(table["noise_gate"]["available"])
    assert "cuda" in table["noise_gate"]["missing"]


def test_forced_backend_env_and_errors(monkeypatch):
    monkeypatch.setenv("AUTOSELECT_BACKEND", "reference")
    assert _backends.choose("noise_gate", torch.device("cpu")) == "reference"
    monkeypatch.setenv("AUTOSELECT_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="forced but cannot run on cpu"):
        _backends.choose("noise_gate", torch.device("cpu"))
    assert autoselect.backends("cpu")["noise_gate"]["chosen"] is None
    monkeypatch.setenv("AUTOSELECT_BACKEND", "fastest")
    with pytest.raises(ValueError, match="not a backend"):
        _backends.choose("noise_gate", torch.device("cpu"))


def test_force_backend_context():
    with force_backend("reference"):
        assert _backends.choose("noise_gate", torch.device("cpu")) == "reference"
    assert _backends.choose("noise_gate", torch.device("cpu")) == "cpp"
    with pytest.raises(ValueError):
        with force_backend("nope"):
            pass


def test_info_with_forced_backend_says_so():
    result = run_cli("info", env={"AUTOSELECT_BACKEND": "triton"})
    assert result.returncode == 0, result.stderr
    assert "AUTOSELECT_BACKEND=triton (forced)" in result.stdout


def test_bench_prints_table_and_appends_rows(tmp_path, capsys):
    # --device cpu: on a GPU machine bench defaults to cuda, which adds the copy row and a row per backend
    assert main(["bench", "--device", "cpu", "--shape", "1,8,16", "--repeats", "2", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "eager/fused" in out
    lines = (tmp_path / "noise_gate.csv").read_text().splitlines()
    assert lines[0].startswith("date,kernel,mode,provider")
    assert len(lines) == 1 + 3 * 2 + 2  # header, 3 modes x 2 providers, 2 memory rows
    assert main(["bench", "--shape", "1,8", "--repeats", "1"]) == 2
