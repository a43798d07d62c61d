"""`autoselect eval`: exact accuracy on hand-made cases, and the harness on a tiny VLM against the
model's own greedy answers."""

import json

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
                               keeps=[576, 16], batch_size=4, progress=False)
    assert [(r["method"], r["keep"]) for r in rows] == [("full", "all"), ("random", 576), ("random", 16),
                                                        ("norm", 576), ("norm", 16)]
    assert rows[0]["accuracy"] == evaluation.accuracy(direct, records)
    assert rows[1]["accuracy"] == rows[0]["accuracy"]  # keeping every token changes nothing
    assert rows[0]["retention"] == (1.0 if rows[0]["accuracy"]["all"] else None)
    evaluation.write_results(rows, str(tmp_path))
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert len(saved["rows"]) == 5
    lines = (tmp_path / "eval.csv").read_text().splitlines()
    assert lines[0] == "method,keep,type,accuracy,retention,count"
    table = evaluation.format_table(rows)
    assert table[0].startswith("method") and len(table) == 2 + len(rows)


def test_bad_methods(tiny):
    from autoselect.training.trainer import load_vlm

    model, processor = load_vlm(str(tiny / "vlm"))
    with pytest.raises(ValueError, match="unknown methods"):
        evaluation.evaluate(model, processor, [], ".", methods=["full", "magic"])
    with pytest.raises(ValueError, match="needs a selector"):
        evaluation.evaluate(model, processor, [], ".", methods=["autoselect"])
