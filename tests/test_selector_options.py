"""AutoSelector's options (DESIGN.md 1.7, the paper's Table 5 variants): each changes what gate()
computes in the way its name says, and each survives save_pretrained / from_pretrained."""

import json

import pytest
import torch

import autoselect
from autoselect import AutoSelector

SMALL_DENOISER = dict(heads=2, head_dim=8, mlp_ratio=2)


def make(**options):
    torch.manual_seed(0)
    options.setdefault("denoiser", "none")
    if isinstance(options["denoiser"], str) and options["denoiser"] != "none":
        options["denoiser"] = {"kind": options["denoiser"], **SMALL_DENOISER}
    selector = AutoSelector(24, scorer=options.pop("scorer", {"layers": 0, "hidden": 16}), keep=5, **options)
    x = torch.randn(2, 20, 24, generator=torch.Generator().manual_seed(1)) * 2 + 1
    selector.update_statistics(x)
    return selector, x


@pytest.mark.parametrize("kind", ["logistic", "laplace"])
def test_noise_throttler_with_each_statistic_and_soft_topk(kind):
    for stats in ("running", "unit"):
        selector, x = make(noise_stats=stats, soft_topk=kind)
        vhat, alpha, scores = selector.gate(x, temperature=0.5, seed=3)
        torch.testing.assert_close(alpha, autoselect.soft_topk(scores, 5, 0.5, kind=kind))
        mean, std = (selector.token_mean, selector.token_std) if stats == "running" else \
            (torch.zeros(24), torch.ones(24))
        torch.testing.assert_close(vhat, autoselect.noise_gate(x, alpha, mean, std, seed=3))
    unit, _ = make(noise_stats="unit")
    unit.token_count.zero_()  # unit statistics need none
    unit.gate(x, temperature=0.5, seed=3)


def test_scale_throttler_multiplies():
    selector, x = make(throttler="scale")
    vhat, alpha, _ = selector.gate(x, temperature=0.5, seed=3)
    torch.testing.assert_close(vhat, x * alpha.unsqueeze(-1))


def test_gumbel_throttler_is_hard_forward_soft_backward():
    selector, x = make(throttler="gumbel")
    vhat, alpha, scores = selector.gate(x, temperature=0.5, seed=3)
    assert set(alpha.detach().unique().tolist()) == {0.0, 1.0}
    assert torch.equal(alpha.detach().sum(-1), torch.full((2, ), 5.0))
    torch.testing.assert_close(vhat, x * alpha.unsqueeze(-1))
    vhat.square().sum().backward()
    assert selector.scorer.fc1.weight.grad.abs().sum() > 0  # the straight-through gradient reaches the scorer
    other, _, _ = selector.gate(x, temperature=0.5, seed=4)
    again, _, _ = selector.gate(x, temperature=0.5, seed=3)
    assert torch.equal(again, vhat) and not torch.equal(other, vhat)  # the Gumbel draw follows the seed


@pytest.mark.parametrize("denoiser, cls_attention, memory", [("diagonal", "diagonal", 0), ("global", "global", 0),
                                                             ({"kind": "diagonal", "memory_slots": 16}, "diagonal",
                                                              16)])
def test_denoiser_kinds(denoiser, cls_attention, memory, tmp_path):
    selector, x = make(denoiser=denoiser)
    assert selector.denoiser.attention == cls_attention and selector.denoiser.memory_slots == memory
    assert selector.config["denoiser"]["kind"] == (denoiser if isinstance(denoiser, str) else denoiser["kind"])
    selector.save_pretrained(tmp_path)
    loaded = AutoSelector.from_pretrained(tmp_path)
    assert loaded.config == selector.config
    torch.testing.assert_close(loaded.gate(x, temperature=0.5, seed=1)[0], selector.gate(x, temperature=0.5, seed=1)[0])
    assert make(denoiser="none")[0].denoiser is None


def test_transformer_scorer_round_trip(tmp_path):
    selector, x = make(scorer={"layers": 1, "width": 16, "heads": 2, "mlp_ratio": 2}, soft_topk="laplace",
                       throttler="scale", noise_stats="unit")
    assert not selector.scorer.head.bias.requires_grad
    selector.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["scorer"] == {"layers": 1, "width": 16, "heads": 2, "mlp_ratio": 2, "eps": 1e-5}
    assert (config["throttler"], config["noise_stats"], config["soft_topk"]) == ("scale", "unit", "laplace")
    loaded = AutoSelector.from_pretrained(tmp_path)
    assert torch.equal(loaded.select(x, 4)[1], selector.select(x, 4)[1])


def test_first_release_config_still_loads(tmp_path, monkeypatch):
    """A config written by the first release (scorer_hidden, eps, denoiser without a kind, none of the
    later options) loads with the first release's behaviour, whatever the defaults are now."""
    old = AutoSelector(24, scorer_hidden=16, eps=1e-6, denoiser=dict(heads=2, head_dim=8, memory_slots=4, mlp_ratio=2))
    old.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("scorer", "throttler", "noise_stats", "soft_topk", "placement"):
        config.pop(key)
    config.update(scorer_hidden=16, eps=1e-6, denoiser=dict(heads=2, head_dim=8, memory_slots=4, mlp_ratio=2))
    (tmp_path / "config.json").write_text(json.dumps(config))
    # defaults that differ from the first release's must not leak into an old config
    for key, value in dict(throttler="scale", noise_stats="unit", soft_topk="laplace",
                           placement="projector_input").items():
        monkeypatch.setitem(AutoSelector.__init__.__kwdefaults__, key, value)
    loaded = AutoSelector.from_pretrained(tmp_path)
    assert loaded.config["scorer"] == {"layers": 0, "hidden": 16, "eps": 1e-6}
    assert loaded.config["denoiser"]["kind"] == "diagonal"
    assert {k: loaded.config[k] for k in ("throttler", "noise_stats", "soft_topk", "placement")} == \
        {"throttler": "noise", "noise_stats": "running", "soft_topk": "logistic", "placement": "projector_output"}
    AutoSelector(24, scorer={"layers": 0, "hidden": 256}).save_pretrained(tmp_path / "mlp")
    config = json.loads((tmp_path / "mlp" / "config.json").read_text())
    del config["scorer"]  # no scorer entry at all: the first release's MLP of width 256
    (tmp_path / "mlp" / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr("autoselect.modules.selector.DEFAULT_SCORER", {"layers": 2, "width": 32, "heads": 2})
    scorer = AutoSelector.from_pretrained(tmp_path / "mlp").config["scorer"]
    assert (scorer["layers"], scorer["hidden"]) == (0, 256)


@pytest.mark.parametrize("options, match", [
    (dict(throttler="dropout"), "throttler must be one of noise, scale, gumbel"),
    (dict(noise_stats="batch"), "noise_stats must be one of running, unit"),
    (dict(soft_topk="sparsemax"), "soft_topk must be one of logistic, laplace"),
    (dict(denoiser="sparse"), "denoiser must be one of diagonal, global, none"),
    (dict(denoiser={"kind": "big"}), "denoiser kind must be one of"),
    (dict(scorer={"layers": 0}, scorer_hidden=8), "not both"),
])
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        AutoSelector(24, **options)


def test_placement_and_keep_range_are_recorded_and_checked(tmp_path):
    """The config records where the selector reads the tokens (issue 13 item 2) and, for a selector
    trained on a range of budgets, the range (item 8); a first-release config reads the projector output."""
    selector = AutoSelector(24, scorer={"layers": 0, "hidden": 8}, denoiser="none", placement="projector_input",
                            keep=32, keep_range=(4, 32))
    assert selector.config["placement"] == "projector_input" and selector.config["keep_range"] == [4, 32]
    selector.save_pretrained(tmp_path / "a")
    loaded = AutoSelector.from_pretrained(tmp_path / "a")
    assert loaded.config == selector.config
    assert AutoSelector(24).config["placement"] == "projector_output" and "keep_range" not in AutoSelector(24).config
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    del config["placement"], config["keep_range"]
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    assert AutoSelector.from_pretrained(tmp_path / "a").config["placement"] == "projector_output"
    with pytest.raises(ValueError, match="placement must be one of projector_input, projector_output"):
        AutoSelector(24, placement="middle")
    for bad in ((8, 4), (0, 4), (4,), (4.0, 8)):
        with pytest.raises(ValueError, match="keep_range"):
            AutoSelector(24, keep_range=bad)
