"""Scorer and AutoSelector: equivariance, the training path, statistics, save/load and its errors."""

import json

import pytest
import torch

import autoselect
from autoselect import AutoSelector, Scorer


def test_scorer_shapes_and_permutation_equivariance():
    torch.manual_seed(0)
    scorer = Scorer(48, layers=0, hidden=32)
    x = torch.randn(3, 577, 48)
    scores = scorer(x)
    assert scores.shape == (3, 577)
    perm = torch.randperm(577)
    torch.testing.assert_close(scorer(x[:, perm]), scores[:, perm], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(\.\.\., N, 48\)"):
        scorer(torch.randn(2, 10, 40))
    with pytest.raises(ValueError, match="dim must be an int >= 1"):
        Scorer(0)


def test_scorer_select_is_its_own_top_k():
    torch.manual_seed(1)
    scorer = Scorer(32, layers=0, hidden=16)
    x = torch.randn(2, 100, 32)
    kept, index, scores = scorer.select(x, 10, return_scores=True)
    assert torch.equal(index, autoselect.select_topk(x, scores, 10)[1])
    with torch.no_grad():
        torch.testing.assert_close(scores, scorer(x), rtol=1e-5, atol=1e-5)


def small_selector(**kwargs):
    config = dict(scorer_hidden=16, keep=8, denoiser=dict(heads=2, head_dim=8, memory_slots=4, mlp_ratio=2),
                  noise_stats="running")  # the running statistics are what these tests check
    config.update(kwargs)
    return AutoSelector(32, **config)


def test_statistics_are_pooled_exactly():
    selector = small_selector()
    chunks = [torch.randn(2, 50, 32) * 3 + 1, torch.randn(7, 32), [torch.randn(5, 32), torch.randn(9, 32) - 2]]
    for chunk in chunks:
        selector.update_statistics(chunk)
    every = torch.cat([chunks[0].reshape(-1, 32), chunks[1], *chunks[2]])
    assert int(selector.token_count) == every.shape[0]
    torch.testing.assert_close(selector.token_mean, every.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(selector.token_std, every.std(0, correction=0), rtol=1e-5, atol=1e-6)


def test_gate_trains_scorer_and_denoiser_within_budget():
    torch.manual_seed(2)
    selector = small_selector()
    x = torch.randn(3, 40, 32)
    with pytest.raises(ValueError, match="update_statistics"):
        selector.gate(x, temperature=1.0, seed=0)
    selector.update_statistics(x)
    vhat, alpha, scores = selector.gate(x, temperature=0.5, seed=3)
    assert vhat.shape == x.shape and alpha.shape == scores.shape == (3, 40)
    torch.testing.assert_close(alpha.sum(-1), torch.full((3, ), 8.0), rtol=1e-5, atol=1e-4)
    (vhat * torch.randn_like(vhat)).sum().backward()
    assert selector.scorer.fc1.weight.grad.abs().sum() > 0
    trained = [p for p in selector.denoiser.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert trained, "the Denoiser receives gradient"
    # The same seed and offset draw the same noise; another offset draws other noise.
    again, _, _ = selector.gate(x, temperature=0.5, seed=3)
    other, _, _ = selector.gate(x, temperature=0.5, seed=3, offset=autoselect.noise_offsets(x.numel()))
    assert torch.equal(again, vhat) and not torch.equal(other, vhat)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(3)
    selector = small_selector(keep=0.25)
    selector.update_statistics(torch.randn(100, 32))
    with torch.no_grad():
        for p in selector.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    selector.save_pretrained(tmp_path / "sel")
    assert sorted(p.name for p in (tmp_path / "sel").iterdir()) == ["config.json", "model.safetensors"]
    loaded = AutoSelector.from_pretrained(tmp_path / "sel")
    assert loaded.config == selector.config
    for (name, a), (_, b) in zip(selector.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randn(2, 64, 32)
    for a, b in zip(selector.select(x, return_scores=True), loaded.select(x, return_scores=True)):
        assert torch.equal(a, b)
    vhat_a = selector.gate(x, temperature=0.3, seed=9)[0]
    vhat_b = loaded.gate(x, temperature=0.3, seed=9)[0]
    assert torch.equal(vhat_a, vhat_b)


def test_without_denoiser(tmp_path):
    selector = small_selector(denoiser=None)
    assert selector.denoiser is None
    x = torch.randn(2, 20, 32)
    selector.update_statistics(x)
    vhat, alpha, _ = selector.gate(x, temperature=1.0, seed=0, k=5)
    torch.testing.assert_close(vhat, autoselect.noise_gate(x, alpha, selector.token_mean, selector.token_std, seed=0))
    selector.save_pretrained(tmp_path)
    assert AutoSelector.from_pretrained(tmp_path).denoiser is None


def test_load_errors_name_the_problem(tmp_path):
    small_selector().save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())

    config["scorer"]["hidden"] = 24
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"shapes differ: scorer.fc1.bias: config gives \(24,\), file holds \(16,\)"):
        AutoSelector.from_pretrained(tmp_path / "a")

    config["scorer"]["hidden"], config["denoiser"] = 16, None
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not in the model the config describes: denoiser"):
        AutoSelector.from_pretrained(tmp_path / "a")

    small_selector(denoiser=None).save_pretrained(tmp_path / "b")
    config["denoiser"] = dict(heads=2, head_dim=8, memory_slots=4, mlp_ratio=2)
    (tmp_path / "b" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing from the weights: denoiser"):
        AutoSelector.from_pretrained(tmp_path / "b")

    (tmp_path / "c").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        AutoSelector.from_pretrained(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text(json.dumps({"format": "something else"}))
    (tmp_path / "c" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not an AutoSelector config"):
        AutoSelector.from_pretrained(tmp_path / "c")


@pytest.mark.parametrize("kwargs, match", [({"keep": 0}, "keep"), ({"keep": 1.5}, "keep"),
                                           ({"denoiser": "big"}, "denoiser")])
def test_bad_config(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        small_selector(**kwargs)
