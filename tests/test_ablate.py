"""`autoselect ablate`: each variant changes exactly its one option from the base (full) training
flags, and a smoke run on a tiny VLM trains, evaluates and compares the variants."""

import csv
import json

import pytest

pytest.importorskip("transformers", reason="the trainer needs transformers (in the [test] extra)")

from autoselect import ablate, cli  # noqa: E402
from autoselect.testbed import data  # noqa: E402
from autoselect.training.trainer import parse_keep, selector_options  # noqa: E402

from conftest import FIRST_RELEASE_FLAGS, save_tiny_testbed_vlm  # noqa: E402

BASE = ["--model", "m", "--data", "d.json", "--test", "t.json", "--out", "o", "--keep", "16", "--scorer-hidden", "16",
        "--denoiser-heads", "2", "--denoiser-head-dim", "8", "--memory-slots", "4", "--scorer-width", "16",
        "--scorer-heads", "2", "--scorer-layers", "0", "--noise-stats", "running", "--soft-topk", "logistic"]


def flat(config, prefix=""):
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed(a, b):
    a, b = flat(a), flat(b)
    return {key for key in set(a) | set(b) if a.get(key, "absent") != b.get(key, "absent")}


def options(args):
    return selector_options(args, 32, "projector_input", parse_keep(args.keep))


# The configuration entries each variant may change (all of them must belong to its one option).
EXPECTED = {
    "throttler-gumbel": lambda keys: keys == {"throttler"},
    "throttler-scale": lambda keys: keys == {"throttler"},
    "denoiser-global": lambda keys: keys == {"denoiser.kind", "denoiser.memory_slots"},  # global has no memory
    "denoiser-none": lambda keys: all(k.split(".")[0] == "denoiser" for k in keys) and keys,
    "noise-stats": lambda keys: keys == {"noise_stats"},
    "memory-slots": lambda keys: keys == {"denoiser.memory_slots"},
    "soft-topk": lambda keys: keys == {"soft_topk"},
    "scorer": lambda keys: "scorer.layers" in keys and all(k.split(".")[0] == "scorer" for k in keys),
    "keep": lambda keys: "keep_range" in keys and keys <= {"keep", "keep_range"},
    "scorer+keep": lambda keys: "scorer.layers" in keys and "keep_range" in keys
    and all(k.split(".")[0] in ("scorer", "keep", "keep_range") for k in keys),
}


def test_every_variant_changes_exactly_its_option():
    base = ablate.build_parser().parse_args(BASE)
    full_args, change = ablate.variant_args(base, "full")
    assert change == "-" and options(full_args) == options(base)
    assert set(EXPECTED) | {"full"} == set(ablate.VARIANTS)
    for name, expected in EXPECTED.items():
        args, change = ablate.variant_args(base, name)
        keys = changed(options(base), options(args))
        assert expected(keys), (name, keys)
        assert change != "-"
    scorer = options(ablate.variant_args(base, "scorer")[0])["scorer"]
    assert scorer["layers"] == 2 and scorer["width"] == 16 and scorer["heads"] == 2
    assert options(ablate.variant_args(base, "keep")[0])["keep_range"] == [16, 192]
    assert options(ablate.variant_args(base, "memory-slots")[0])["denoiser"]["memory_slots"] == 0
    assert ablate.variant_args(base, "denoiser-global")[1] == \
        "denoiser diagonal -> global (no memory: memory_slots 4 -> 0)"
    # toggles go the other way from the other base
    other = ablate.build_parser().parse_args(BASE + ["--noise-stats", "unit", "--soft-topk", "laplace", "--keep",
                                                     "16:64", "--memory-slots", "0", "--scorer-layers", "1"])
    assert options(ablate.variant_args(other, "noise-stats")[0])["noise_stats"] == "running"
    assert options(ablate.variant_args(other, "soft-topk")[0])["soft_topk"] == "logistic"
    assert "keep_range" not in options(ablate.variant_args(other, "keep")[0])
    assert options(ablate.variant_args(other, "memory-slots")[0])["denoiser"]["memory_slots"] == 64
    assert options(ablate.variant_args(other, "scorer")[0])["scorer"]["layers"] == 0


def test_variant_errors():
    base = ablate.build_parser().parse_args(BASE + ["--throttler", "gumbel"])
    with pytest.raises(ValueError, match="already uses --throttler gumbel"):
        ablate.variant_args(base, "throttler-gumbel")
    with pytest.raises(ValueError, match="unknown variants"):
        ablate.parse_variants("full,magic")
    assert ablate.parse_variants("soft-topk,full,soft-topk") == ["full", "soft-topk"]
    assert ablate.parse_variants("noise-stats+soft-topk") == ["full", "noise-stats+soft-topk"]
    with pytest.raises(ValueError, match="unknown variants"):
        ablate.parse_variants("scorer+magic")
    base_ok = ablate.build_parser().parse_args(BASE)
    for bad in ("scorer+scorer", "full+keep", "scorer+"):
        with pytest.raises(ValueError, match="join distinct variants"):
            ablate.variant_args(base_ok, bad)
    both, change = ablate.variant_args(base_ok, "noise-stats+soft-topk")
    assert changed(options(base_ok), options(both)) == {"noise_stats", "soft_topk"}
    assert change == "noise_stats running -> unit; soft_topk logistic -> laplace"
    assert ablate.parse_variants(None) == list(ablate.VARIANTS)
    with pytest.raises(ValueError, match="--resume is not supported"):
        ablate.ablate(ablate.build_parser().parse_args(BASE + ["--resume", "latest"]))
    none = ablate.build_parser().parse_args(BASE + ["--denoiser", "none"])
    with pytest.raises(ValueError, match="needs the diagonal Denoiser"):
        ablate.variant_args(none, "memory-slots")


def test_ablate_smoke_run(tmp_path, capsys):
    data.write_split(str(tmp_path / "train"), "train", 8, seed=0, questions_per_image=1, progress=False)
    data.write_split(str(tmp_path / "test"), "test", 6, seed=1, questions_per_image=1, progress=False)
    save_tiny_testbed_vlm(tmp_path / "vlm", seed=0)
    out = tmp_path / "ablation"
    assert cli.main(["ablate", "--model", str(tmp_path / "vlm"), "--data", str(tmp_path / "train" / "train.json"),
                     "--test", str(tmp_path / "test" / "test.json"), "--out", str(out), "--variants",
                     "full,noise-stats", "--steps", "2", "--keep-list", "16", "--keep", "16", "--batch-size", "4",
                     "--scorer-hidden", "16",
                     *FIRST_RELEASE_FLAGS, "--denoiser-heads", "2", "--denoiser-head-dim", "8", "--memory-slots",
                     "2", "--stats-images", "4", "--warmup", "1", "--eval-batch-size", "3", "--resamples", "200",
                     "--device", "cpu", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "vs full variant [95% CI]" in printed and "noise_stats running -> unit" in printed
    configs = {name: json.loads((out / "variants" / name / "selector" / "config.json").read_text())
               for name in ("full", "noise-stats")}
    assert changed(configs["full"], configs["noise-stats"]) == {"noise_stats"}
    assert configs["full"]["scorer"]["hidden"] == 16  # the training flags reach every variant
    assert configs["noise-stats"]["denoiser"]["memory_slots"] == 2
    saved = json.loads((out / "ablation.json").read_text())
    assert [(r["variant"], r["keep"]) for r in saved["rows"]] == [("full", 16), ("noise-stats", 16)]
    assert saved["rows"][0]["vs_full_variant"] is None
    interval = saved["rows"][1]["vs_full_variant"]
    assert interval["low"] <= interval["difference"] <= interval["high"] and interval["count"] == 6
    assert isinstance(interval["tie"], bool) and interval["resamples"] == 200
    assert len(saved["question_ids"]) == 6 and len(saved["rows"][1]["correct"]) == 6
    assert saved["variants"]["noise-stats"]["change"] == "noise_stats running -> unit"
    assert saved["variants"]["full"]["train"]["steps_run"] == 2
    with open(out / "ablation.csv") as handle:
        lines = list(csv.DictReader(handle))
    overall = [line for line in lines if line["type"] == "all"]
    assert [line["variant"] for line in overall] == ["full", "noise-stats"]
    assert overall[0]["difference_vs_full_variant"] == "" and overall[1]["low_vs_full_variant"] != ""
