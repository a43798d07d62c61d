"""`autoselect train` options (issue 13 items 2, 4, 8): the placement (LLaVA: projector_input by default,
projector_output by flag), every AutoSelector option as a flag that lands in the saved config, the
temperature schedules, a budget drawn per step from a range, early stopping on validation loss."""

import json
import math
import shutil

import pytest
import torch

pytest.importorskip("transformers", reason="the trainer needs transformers (in the [test] extra)")

from autoselect import AutoSelector  # noqa: E402
from autoselect.testbed import data  # noqa: E402
from autoselect.training import trainer  # noqa: E402
from autoselect.training.trainer import budget_at, build_parser, parse_keep, temperature_at, train  # noqa: E402

from conftest import FIRST_RELEASE_FLAGS, save_tiny_testbed_vlm  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("training_options")
    data.write_split(str(root / "data"), "train", 16, seed=0, questions_per_image=1, progress=False)
    data.write_split(str(root / "val"), "test", 4, seed=3, questions_per_image=1, progress=False)
    save_tiny_testbed_vlm(root / "vlm", seed=0)
    return root


def run(setup, out, *extra, keep="16"):
    args = build_parser().parse_args(["--model", str(setup / "vlm"), "--data", str(setup / "data" / "train.json"),
                                      "--out", str(out), "--keep", keep, "--batch-size", "4", "--scorer-hidden", "16",
                                      *FIRST_RELEASE_FLAGS, "--denoiser-heads", "2", "--denoiser-head-dim", "8",
                                      "--stats-images", "4",
                                      "--warmup", "1", "--lr", "3e-3", "--log-every", "1", "--no-progress",
                                      "--device", "cpu", *extra])
    return train(args)


def log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def config(out):
    return json.loads((out / "selector" / "config.json").read_text())


# -- placement -----------------------------------------------------------------------------------------

def test_llava_trains_at_the_projector_input_by_default_and_the_output_by_flag(setup, tmp_path):
    run(setup, tmp_path / "in", "--steps", "1", "--memory-slots", "2")
    assert config(tmp_path / "in")["placement"] == "projector_input"
    run(setup, tmp_path / "out", "--steps", "1", "--memory-slots", "2", "--placement", "projector_output")
    assert config(tmp_path / "out")["placement"] == "projector_output"
    # the tiny testbed VLM: vision width 32, text width 32; check against the projector's own widths
    from autoselect.hf import load_vlm

    model, _ = load_vlm(str(setup / "vlm"))
    projector = model.model.multi_modal_projector
    assert config(tmp_path / "in")["dim"] == projector.linear_1.in_features
    assert config(tmp_path / "out")["dim"] == projector.linear_2.out_features


def test_projector_input_training_reaches_the_selector_through_the_frozen_projector(setup, tmp_path, monkeypatch):
    """The gate's output goes through the frozen projector (its weights get no gradient, the selector's
    do), and the tokens the gate reads are the projector's input."""
    seen = {}
    original_gate = AutoSelector.gate

    def gate(self, x, **kw):
        seen["gate_input"] = x.detach().clone()
        return original_gate(self, x, **kw)

    original_project = trainer.to_language_model

    def project(model, tokens, placement):
        out = original_project(model, tokens, placement)
        seen["projected"] = (tokens.detach().clone(), out.detach().clone(), model)
        return out

    monkeypatch.setattr(AutoSelector, "gate", gate)
    monkeypatch.setattr(trainer, "to_language_model", project)
    summary = run(setup, tmp_path / "a", "--steps", "2", "--memory-slots", "2", "--check-frozen")
    tokens, out, model = seen["projected"]
    projector = model.model.multi_modal_projector
    torch.testing.assert_close(out, projector(tokens))
    assert all(p.grad is None and not p.requires_grad for p in projector.parameters())
    assert seen["gate_input"].shape[-1] == projector.linear_1.in_features
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in summary["selector"].scorer.parameters())


# -- every option is a flag ------------------------------------------------------------------------------

def test_every_selector_option_reaches_the_saved_config(setup, tmp_path):
    run(setup, tmp_path / "a", "--steps", "1", "--scorer-layers", "1", "--scorer-width", "16", "--scorer-heads", "2",
        "--scorer-mlp-ratio", "2", "--denoiser", "global", "--denoiser-mlp-ratio", "3", "--throttler", "scale",
        "--noise-stats", "unit", "--soft-topk", "laplace")
    saved = config(tmp_path / "a")
    assert saved["scorer"]["layers"] == 1 and saved["scorer"]["width"] == 16 and saved["scorer"]["heads"] == 2
    assert saved["scorer"]["mlp_ratio"] == 2
    assert saved["denoiser"] == {"kind": "global", "heads": 2, "head_dim": 8, "memory_slots": 0, "mlp_ratio": 3}
    assert (saved["throttler"], saved["noise_stats"], saved["soft_topk"]) == ("scale", "unit", "laplace")
    AutoSelector.from_pretrained(tmp_path / "a" / "selector")  # loads

    run(setup, tmp_path / "b", "--steps", "1", "--scorer-hidden", "12", "--memory-slots", "3", "--throttler", "gumbel")
    saved = config(tmp_path / "b")
    assert saved["scorer"]["layers"] == 0 and saved["scorer"]["hidden"] == 12
    assert saved["denoiser"]["kind"] == "diagonal" and saved["denoiser"]["memory_slots"] == 3
    assert saved["throttler"] == "gumbel" and saved["noise_stats"] == "running" and saved["soft_topk"] == "logistic"

    run(setup, tmp_path / "c", "--steps", "1", "--denoiser", "none")
    assert config(tmp_path / "c")["denoiser"] == {"kind": "none"}


# -- temperature -----------------------------------------------------------------------------------------

def test_temperature_schedules():
    assert temperature_at(0, 11, 2.0, 0.1, "cosine") == 2.0
    assert abs(temperature_at(10, 11, 2.0, 0.1, "cosine") - 0.1) < 1e-12
    assert abs(temperature_at(5, 11, 2.0, 0.1, "cosine") - 1.05) < 1e-12  # the midpoint of a cosine
    assert abs(temperature_at(5, 11, 2.0, 0.1, "geometric") - math.sqrt(0.2)) < 1e-12
    with pytest.raises(ValueError, match="schedule"):
        temperature_at(0, 10, 1.0, 0.1, "linear")


def test_temperature_flags_reach_the_run(setup, tmp_path):
    run(setup, tmp_path / "a", "--steps", "3", "--memory-slots", "2", "--temperature", "2.0:0.1",
        "--temperature-schedule", "cosine")
    assert [e["temperature"] for e in log(tmp_path / "a")] == pytest.approx([2.0, 1.05, 0.1])
    with pytest.raises(ValueError, match="START:END"):
        run(setup, tmp_path / "b", "--steps", "1", "--temperature", "2.0")


def test_learning_rate_warms_up_linearly_then_decays_by_cosine():
    from autoselect.training.trainer import learning_rate_at

    assert [learning_rate_at(s, 12, 1.0, 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate_at(8, 12, 1.0, 4) == pytest.approx(0.5)  # half-way through the decay
    assert learning_rate_at(12, 12, 1.0, 4) == pytest.approx(0.0)


# -- one selector for every budget -----------------------------------------------------------------------

def test_budget_draws_vary_within_the_range_and_follow_the_seed():
    draws = [budget_at(step, (16, 192), seed=0) for step in range(200)]
    assert min(draws) >= 16 and max(draws) <= 192 and len(set(draws)) > 50
    assert draws == [budget_at(step, (16, 192), seed=0) for step in range(200)]
    assert draws != [budget_at(step, (16, 192), seed=1) for step in range(200)]
    assert all(budget_at(step, (64, 64), seed=0) == 64 for step in range(10))
    assert parse_keep("16:192") == (16, 192) and parse_keep("64") == (64, 64)
    for bad in ("0", "192:16", "a:b", "1:2:3"):
        with pytest.raises(ValueError, match="--keep"):
            parse_keep(bad)


def test_keep_range_run_logs_the_drawn_budgets_and_resumes_the_same_sequence(setup, tmp_path):
    run(setup, tmp_path / "straight", "--steps", "4", "--memory-slots", "2", keep="4:32")
    entries = log(tmp_path / "straight")
    drawn = [e["keep"] for e in entries]
    assert drawn == [budget_at(step, (4, 32), seed=0) for step in range(4)]
    assert len(set(drawn)) > 1
    for e in entries:  # the soft top-K met each step's budget
        assert abs(e["alpha_sum_min"] - e["keep"]) < 1e-2 and abs(e["alpha_sum_max"] - e["keep"]) < 1e-2
    saved = config(tmp_path / "straight")
    assert saved["keep"] == 32 and saved["keep_range"] == [4, 32]

    run(setup, tmp_path / "resumed", "--steps", "4", "--memory-slots", "2", "--save-every", "2", keep="4:32")
    for name in ("selector", "checkpoint-4", "train_log.jsonl"):
        shutil.rmtree(tmp_path / "resumed" / name, ignore_errors=True)
        (tmp_path / "resumed" / name).unlink(missing_ok=True) if (tmp_path / "resumed" / name).is_file() else None
    run(setup, tmp_path / "resumed", "--steps", "4", "--memory-slots", "2", "--resume", "latest", keep="4:32")
    assert [e["keep"] for e in log(tmp_path / "resumed")] == drawn[2:]
    straight = AutoSelector.from_pretrained(tmp_path / "straight" / "selector")
    resumed = AutoSelector.from_pretrained(tmp_path / "resumed" / "selector")
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


# -- early stopping ----------------------------------------------------------------------------------------

def test_validation_loss_is_logged_and_the_best_selector_kept(setup, tmp_path):
    summary = run(setup, tmp_path / "a", "--steps", "2", "--memory-slots", "2", "--val",
                  str(setup / "val" / "test.json"), "--val-every", "1")
    entries = log(tmp_path / "a")
    assert all(math.isfinite(e["val_loss"]) for e in entries) and len(entries) == 2
    assert summary["best_val_loss"] == min(e["val_loss"] for e in entries)
    best = AutoSelector.from_pretrained(tmp_path / "a" / "best")
    final = AutoSelector.from_pretrained(tmp_path / "a" / "selector")
    for (name, a), (_, b) in zip(best.state_dict().items(), final.state_dict().items()):
        assert torch.equal(a, b), name


def test_early_stopping_stops_after_patience_and_keeps_the_best(setup, tmp_path, monkeypatch):
    losses = iter([3.0, 2.0, 2.5, 2.6, 1.0, 0.5])
    monkeypatch.setattr(trainer, "validation_loss", lambda *a, **k: next(losses))
    summary = run(setup, tmp_path / "a", "--steps", "6", "--memory-slots", "2", "--val",
                  str(setup / "val" / "test.json"), "--val-every", "1", "--patience", "2", "--save-every", "1")
    assert summary["stopped_early"] and summary["steps_run"] == 4
    assert summary["best_step"] == 2 and summary["best_val_loss"] == 2.0
    entries = log(tmp_path / "a")
    assert [e["step"] for e in entries] == [1, 2, 3, 4] and entries[-1].get("early_stop") is True
    at_two = AutoSelector.from_pretrained(tmp_path / "a" / "checkpoint-2")
    final = AutoSelector.from_pretrained(tmp_path / "a" / "selector")
    for (name, a), (_, b) in zip(at_two.state_dict().items(), final.state_dict().items()):
        assert torch.equal(a, b), name
    assert not (tmp_path / "a" / "checkpoint-5").exists()


def test_two_processes_share_each_steps_drawn_budget(setup, tmp_path):
    """With --keep LOW:HIGH, 2 processes on 2 images each take the same steps as 1 process on 4: both
    processes draw the same budget each step (a different one would change the summed gradient)."""
    import os
    import subprocess
    import sys

    common = ["--model", str(setup / "vlm"), "--data", str(setup / "data" / "train.json"), "--keep", "4:32",
              "--scorer-hidden", "16",
              *FIRST_RELEASE_FLAGS, "--denoiser-heads", "2", "--denoiser-head-dim", "8", "--memory-slots", "2",
              "--stats-images", "4", "--warmup", "1", "--lr", "3e-3", "--log-every", "1", "--no-progress",
              "--device", "cpu", "--steps", "2"]
    single = train(build_parser().parse_args(common + ["--out", str(tmp_path / "single"), "--batch-size", "4"]))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29541",
               "-m", "autoselect", "train", *common, "--out", str(tmp_path / "ddp"), "--batch-size", "2"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert [e["keep"] for e in log(tmp_path / "ddp")] == [e["keep"] for e in log(tmp_path / "single")]
    ddp = AutoSelector.from_pretrained(tmp_path / "ddp" / "selector")
    for (name, a), (_, b) in zip(single["selector"].state_dict().items(), ddp.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
