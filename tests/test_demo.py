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


def test_demo_writes_its_outputs_under_the_current_directory(tmp_path, monkeypatch, capsys):
    """Without --out / --data everything lands under ./demo (not beside the installed package), and
    --version 2 writes testbed v2's test split (image-first records, three questions per image)."""
    save_tiny_testbed_vlm(tmp_path / "vlm")
    AutoSelector(32, scorer_hidden=8, denoiser=None).save_pretrained(tmp_path / "selector")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert cli.main(["demo", "--version", "2", "--vlm", str(tmp_path / "vlm"), "--selector", str(tmp_path / "selector"),
                     "--test", "2", "--keep", "64", "--methods", "full,autoselect", "--no-progress"]) == 0
    records = json.loads((work / "demo" / "testbed-v2" / "test.json").read_text())
    assert len(records) == 6 and all(r["conversations"][0]["value"].startswith("<image>") for r in records)
    results = json.loads((work / "demo" / "eval.json").read_text())
    assert results["meta"]["version"] == 2 and results["meta"]["questions"] == 6
    assert (work / "demo" / "kept.png").is_file() and (work / "demo" / "prefill.json").is_file()


def test_demo_names_where_the_shipped_weights_come_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="README.md"):
        cli.main(["demo", "--version", "2", "--vlm", str(tmp_path / "none")])
