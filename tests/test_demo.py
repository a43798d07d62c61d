"""`autoselect demo` end to end on a tiny untrained VLM and selector (the shipped ones are tested by
running the demo itself): table, files and prefill figures are produced; missing weights are a clear error."""

import json

import pytest

pytest.importorskip("transformers", reason="needs transformers (in the [test] extra)")

from autoselect import AutoSelector, cli  # noqa: E402

from conftest import save_tiny_testbed_vlm  # noqa: E402


@pytest.mark.parametrize("placement", ["projector_output", "projector_input"])
def test_demo_runs_and_writes_its_outputs(tmp_path, capsys, placement):
    save_tiny_testbed_vlm(tmp_path / "vlm")
    selector = AutoSelector(32, scorer_hidden=8, denoiser=None, placement=placement)
    selector.save_pretrained(tmp_path / "selector")
    assert cli.main(["demo", "--vlm", str(tmp_path / "vlm"), "--selector", str(tmp_path / "selector"), "--data",
                     str(tmp_path / "data"), "--test", "8", "--keep", "128,64", "--methods", "full,autoselect,norm",
                     "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "retention" in printed and "prefill, batch 8, keep 64 of 576" in printed
    results = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert [(r["method"], r["keep"]) for r in results["rows"]] == [("full", "all"), ("autoselect", 128),
                                                                   ("autoselect", 64), ("norm", 128), ("norm", 64)]
    prefill = json.loads((tmp_path / "out" / "prefill.json").read_text())
    assert prefill["keep_language_model_ms"] > 0 and prefill["tokens_per_image"] == 576
    assert (tmp_path / "out" / "kept.png").stat().st_size > 0


def test_demo_without_weights_says_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no model"):
        cli.main(["demo", "--vlm", str(tmp_path / "none"), "--selector", str(tmp_path / "none")])
