"""`autoselect eval`: exact accuracy on hand-made cases, and the harness on a tiny VLM against the
model's own greedy answers."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="the evaluator needs transformers (in the [test] extra)")

from autoselect import evaluation  # noqa: E402
from autoselect.testbed import data, vlm  # noqa: E402

from conftest import save_tiny_testbed_vlm  # noqa: E402


def record(answer, kind):
    return {"image": "x.png", "type": kind,
            "conversations": [{"from": "human", "value": "<image>\nq?"}, {"from": "gpt", "value": answer}]}


def test_accuracy_on_a_hand_made_case():
    records = [record("Red", "color"), record("circle", "shape"), record("yes", "exist"), record("3", "count"),
               record("no", "exist")]
    predictions = ["red.", "square", " Yes it is", "3", ""]
    scores = evaluation.accuracy(predictions, records)
    assert scores == {"all": 3 / 5, "color": 1.0, "count": 1.0, "exist": 0.5, "shape": 0.0}
    assert list(scores)[0] == "all"
    with pytest.raises(ValueError, match="2 predictions for 5 records"):
        evaluation.accuracy(predictions[:2], records)


def test_normalise():
    assert evaluation.normalise("  Yes, it is.") == "yes"
    assert evaluation.normalise("") == ""
    assert evaluation.normalise("4") == "4"


# -- paired bootstrap ------------------------------------------------------------------------------------

def paired(right_a, right_b, n, seed=0):
    """Correctness of A and B on n questions: A right on the first right_a, B on the last right_b
    (so that they disagree as much as possible)."""
    a = np.zeros(n, dtype=int)
    a[:right_a] = 1
    b = np.zeros(n, dtype=int)
    b[n - right_b:] = 1
    return a, b


def test_bootstrap_of_a_method_against_itself_is_exactly_zero():
    rng = np.random.default_rng(3)
    correct = rng.integers(0, 2, size=321)
    result = evaluation.paired_bootstrap(correct, correct, resamples=500, seed=1)
    assert (result["difference"], result["low"], result["high"], result["tie"]) == (0.0, 0.0, 0.0, True)
    ids = [f"q{i}" for i in range(321)]
    order = rng.permutation(321)  # the same method, its questions listed in another order
    result = evaluation.paired_bootstrap(correct, correct[order], ids, [ids[i] for i in order], resamples=500)
    assert (result["low"], result["high"]) == (0.0, 0.0)


def test_bootstrap_separates_60_of_100_from_40_of_100():
    a, b = paired(60, 40, 100)
    result = evaluation.paired_bootstrap(a, b, resamples=2000, seed=0)
    assert result["difference"] == pytest.approx(0.2)
    assert 0 < result["low"] < 0.2 < result["high"] and not result["tie"]
    reverse = evaluation.paired_bootstrap(b, a, resamples=2000, seed=0)
    assert reverse["high"] < 0 and not reverse["tie"]


def test_bootstrap_calls_a_two_in_500_margin_a_tie():
    a, b = paired(252, 250, 500)
    result = evaluation.paired_bootstrap(a, b, resamples=2000, seed=0)
    assert result["difference"] == pytest.approx(0.004)
    assert result["low"] < 0 < result["high"] and result["tie"]
    assert evaluation.format_difference(result).endswith(" tie")


def test_bootstrap_interval_is_paired():
    """Two methods that agree on every question but one: the paired interval is tiny; resampling the
    two vectors independently would give an interval about as wide as the accuracy's own (~ +-0.1)."""
    a = np.tile([1, 0], 50)
    b = a.copy()
    b[0] = 0
    result = evaluation.paired_bootstrap(a, b, resamples=2000, seed=0)
    assert 0 <= result["low"] and result["high"] <= 0.04


def test_bootstrap_is_deterministic_for_a_seed():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2, size=200), rng.integers(0, 2, size=200)
    first = evaluation.paired_bootstrap(a, b, resamples=1000, seed=7)
    assert evaluation.paired_bootstrap(a, b, resamples=1000, seed=7) == first
    others = [evaluation.paired_bootstrap(a, b, resamples=1000, seed=s) for s in (8, 9)]
    assert any((o["low"], o["high"]) != (first["low"], first["high"]) for o in others)


def test_bootstrap_aligns_by_question_id_and_rejects_misaligned_sets():
    a, b = paired(60, 40, 100)
    ids = [f"q{i}" for i in range(100)]
    order = np.random.default_rng(1).permutation(100)
    shuffled = evaluation.paired_bootstrap(a, b[order], ids, [ids[i] for i in order], resamples=500, seed=2)
    assert shuffled == evaluation.paired_bootstrap(a, b, ids, ids, resamples=500, seed=2)
    with pytest.raises(ValueError, match="different questions"):
        evaluation.paired_bootstrap(a, b, ids, ids[:-1] + ["other"], resamples=10)
    with pytest.raises(ValueError, match="not the same questions"):
        evaluation.paired_bootstrap(a, b[:-1], resamples=10)
    with pytest.raises(ValueError, match="unique"):
        evaluation.paired_bootstrap(a, b, ids, ids[:-1] + ["q0"], resamples=10)
    with pytest.raises(ValueError, match="for both"):
        evaluation.paired_bootstrap(a, b, ids, None, resamples=10)
    with pytest.raises(ValueError, match="repeated"):
        evaluation.question_ids([{"id": "x"}, {"id": "x"}])


def test_differences_in_rows_files_and_table(tmp_path):
    ids = [f"q{i}" for i in range(100)]
    autoselect, other = paired(60, 40, 100)
    full = np.ones(100, dtype=int)

    def row(method, keep, correct):
        accuracy = float(np.mean(correct))
        return {"method": method, "keep": keep, "accuracy": {"all": accuracy}, "retention": accuracy, "count": 100,
                "correct": [int(c) for c in correct], "ids": ids}

    rows = [row("full", "all", full), row("autoselect", 64, autoselect), row("norm", 64, other),
            row("random", 64, autoselect)]
    evaluation.add_differences(rows, resamples=1000, seed=0)
    assert rows[0]["vs_autoselect"] is None and rows[0]["vs_full"] is None and rows[1]["vs_autoselect"] is None
    assert rows[2]["vs_autoselect"]["difference"] == pytest.approx(-0.2) and not rows[2]["vs_autoselect"]["tie"]
    assert rows[3]["vs_autoselect"]["low"] == rows[3]["vs_autoselect"]["high"] == 0.0
    assert rows[3]["vs_autoselect"]["tie"]
    assert rows[1]["vs_full"]["difference"] == pytest.approx(-0.4)
    table = evaluation.format_table(rows)
    assert "vs autoselect [95% CI]" in table[0] and "vs full [95% CI]" in table[0]
    assert "-0.200 [" in table[4] and " tie" in table[5] and " tie" not in table[4]
    evaluation.write_results(rows, str(tmp_path))
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["question_ids"] == ids and "ids" not in saved["rows"][0]
    assert saved["rows"][2]["vs_autoselect"] == rows[2]["vs_autoselect"]
    assert saved["rows"][2]["correct"] == rows[2]["correct"]
    lines = [line.split(",") for line in (tmp_path / "eval.csv").read_text().splitlines()]
    header = lines[0]
    norm = dict(zip(header, lines[3]))
    assert norm["method"] == "norm" and float(norm["difference_vs_autoselect"]) == pytest.approx(-0.2)
    assert float(norm["low_vs_autoselect"]) < float(norm["high_vs_autoselect"]) < 0
    assert norm["tie_vs_autoselect"] == "false" and dict(zip(header, lines[4]))["tie_vs_autoselect"] == "true"
    assert dict(zip(header, lines[1]))["difference_vs_autoselect"] == ""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data.write_split(str(root / "data"), "test", 6, seed=0, questions_per_image=1, progress=False)
    save_tiny_testbed_vlm(root / "vlm", seed=1)
    return root


def test_harness_matches_direct_greedy_answers(tiny, tmp_path):
    from autoselect.training.trainer import load_vlm

    model, processor = load_vlm(str(tiny / "vlm"))
    records = json.loads((tiny / "data" / "test.json").read_text())
    # The model's own greedy first answers, computed without the harness.
    direct = []
    for r in records:
        question = r["conversations"][0]["value"].replace("<image>", "").strip()
        image = data.render(data.Scene.from_dict(json.loads((tiny / "data" / "test_scenes.json").read_text())[r["image"]]))
        batch = processor(images=[image], text=[vlm.prompt(question)], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=4, do_sample=False)
        direct.append(processor.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True))
    rows = evaluation.evaluate(model, processor, records, str(tiny / "data"), methods=["full", "random", "norm"],
                               keeps=[576, 16], batch_size=4, progress=False, resamples=200)
    assert [(r["method"], r["keep"]) for r in rows] == [("full", "all"), ("random", 576), ("random", 16),
                                                        ("norm", 576), ("norm", 16)]
    assert rows[0]["accuracy"] == evaluation.accuracy(direct, records)
    assert rows[1]["accuracy"] == rows[0]["accuracy"]  # keeping every token changes nothing
    assert rows[0]["retention"] == (1.0 if rows[0]["accuracy"]["all"] else None)
    assert rows[0]["correct"] == evaluation.correctness(direct, records)
    assert rows[0]["ids"] == [r["id"] for r in records]
    # keeping every token: the same answers, so exactly no difference to the full model
    assert (rows[1]["vs_full"]["low"], rows[1]["vs_full"]["high"], rows[1]["vs_full"]["tie"]) == (0.0, 0.0, True)
    assert all(r["vs_autoselect"] is None for r in rows)  # no autoselect row to compare with
    evaluation.write_results(rows, str(tmp_path))
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert len(saved["rows"]) == 5
    lines = (tmp_path / "eval.csv").read_text().splitlines()
    assert lines[0].startswith("method,keep,type,accuracy,retention,count,difference_vs_autoselect,")
    table = evaluation.format_table(rows)
    assert table[0].startswith("method") and len(table) == 2 + len(rows)


def test_bad_methods(tiny):
    from autoselect.training.trainer import load_vlm

    model, processor = load_vlm(str(tiny / "vlm"))
    with pytest.raises(ValueError, match="unknown methods"):
        evaluation.evaluate(model, processor, [], ".", methods=["full", "magic"])
    with pytest.raises(ValueError, match="needs a selector"):
        evaluation.evaluate(model, processor, [], ".", methods=["autoselect"])
