"""One harness (issue 13, item 9): one prompt template, one IGNORE_INDEX, one collator, one evaluator and
one training loop (`training.loop.Trainer`) shared by the selector trainer and the testbed's VLM training."""

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the tiny VLM needs transformers (in the [test] extra)")

from autoselect import conversation, evaluation  # noqa: E402
from autoselect.conversation import IGNORE_INDEX, llava_prompt  # noqa: E402
from autoselect.testbed import data, vlm  # noqa: E402
from autoselect.training.data import ConversationCollator  # noqa: E402
from autoselect.training.loop import Trainer, learning_rate_at, scaled, warmup_cosine  # noqa: E402

PACKAGE = Path(__file__).resolve().parents[1] / "autoselect"


@pytest.fixture(scope="module")
def processor():
    return vlm.build_processor()


# ----------------------------------------------------------------------------------------------------
# One template
# ----------------------------------------------------------------------------------------------------

def test_template_strings_are_the_shipped_models():
    assert llava_prompt("Q?") == "USER: Q? ASSISTANT:"
    assert llava_prompt("Q?", system="S.", answer="a") == "S. USER: Q? ASSISTANT: a</s>"
    # The tiny VLM in weights/tiny-vlm was trained on exactly this text.
    assert vlm.prompt("What color is the circle?", "red") == \
        "USER: What color is the circle?\n<image> ASSISTANT: red</s>"
    assert vlm.prompt("What color is the circle?") == "USER: What color is the circle?\n<image> ASSISTANT:"


def test_evaluation_prompt_is_the_prefix_of_the_training_encoding(processor):
    """The evaluator's prompt (answers=False) is the training encoding up to the answer, and it is the
    text vlm.prompt writes: one template for training, evaluation and the testbed."""
    collator = ConversationCollator(processor, ".")
    record = {"image": "x.png", "conversations": [{"from": "human", "value": "Is there a red cross?\n<image>"},
                                                  {"from": "gpt", "value": "yes"}]}
    prompt_ids, prompt_labels = collator.encode(record, 576, answers=False)
    ids, labels = collator.encode(record, 576)
    assert ids[:len(prompt_ids)] == prompt_ids and set(prompt_labels) == {IGNORE_INDEX}
    assert processor.tokenizer.convert_ids_to_tokens(ids[len(prompt_ids):]) == ["yes", "</s>"]
    expected = processor(images=[data.render(next(data.generate("val", 1))[1])],
                         text=[vlm.prompt("Is there a red cross?")], return_tensors="pt")["input_ids"][0].tolist()
    assert prompt_ids == expected


def test_show_builds_its_prompt_with_the_shared_template(monkeypatch):
    from autoselect import show

    class Built(Exception):
        pass

    def capture(question, **_):
        raise Built(question)

    monkeypatch.setattr(show, "llava_prompt", capture)
    with pytest.raises(Built) as caught:
        show.kept_indices(None, SimpleNamespace(image_token="<image>"), None, method="random", keep=4)
    assert caught.value.args[0] == "<image>\nDescribe the image."


# ----------------------------------------------------------------------------------------------------
# One IGNORE_INDEX
# ----------------------------------------------------------------------------------------------------

def test_ignore_index_is_defined_once():
    from autoselect.integrations import _core
    from autoselect.testbed import train_vlm
    from autoselect.training import data as training_data

    assert training_data.IGNORE_INDEX is _core.IGNORE_INDEX is train_vlm.IGNORE_INDEX is conversation.IGNORE_INDEX
    assignments = []
    for path in PACKAGE.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"\s*[A-Z_]+\s*=\s*-100\b", line) or re.match(r"\s*IGNORE_INDEX\s*=", line):
                assignments.append(f"{path.relative_to(PACKAGE)}:{number}")
    assert assignments == ["conversation.py:15"]


# ----------------------------------------------------------------------------------------------------
# One collator (the testbed's curriculum through it)
# ----------------------------------------------------------------------------------------------------

def test_collator_curriculum_batch_matches_a_hand_built_encoding(processor):
    """Question-first turns, row i's image expanded to image_tokens[i] tokens, left padding, labels on the
    answers and their </s> only: the ids train_vlm's stage 2 trains on."""
    tokenizer = processor.tokenizer
    ids_of = tokenizer.convert_tokens_to_ids
    collator = ConversationCollator(processor, ".")
    images = [data.render(scene) for _, scene, _ in data.generate("val", 2)]
    conversations = [[(vlm.image_question("What color is the circle?"), "red"), ("How many squares are there?", "2")],
                     [(vlm.image_question("Is there a cross?"), "no")]]
    batch = collator.batch(images, conversations, [5, 7])
    image = ids_of("<image>")
    head = ids_of(["user", ":", "what", "color", "is", "the", "circle", "?"]) + [image] * 5 + ids_of(["assistant", ":"])
    second = ids_of(["user", ":", "how", "many", "squares", "are", "there", "?", "assistant", ":"])
    row0 = head + ids_of(["red", "</s>"]) + second + ids_of(["2", "</s>"])
    labels0 = ([IGNORE_INDEX] * len(head) + ids_of(["red", "</s>"]) + [IGNORE_INDEX] * len(second)
               + ids_of(["2", "</s>"]))
    head1 = ids_of(["user", ":", "is", "there", "a", "cross", "?"]) + [image] * 7 + ids_of(["assistant", ":"])
    row1 = head1 + ids_of(["no", "</s>"])
    labels1 = [IGNORE_INDEX] * len(head1) + ids_of(["no", "</s>"])
    pad = len(row0) - len(row1)
    assert batch["input_ids"].tolist() == [row0, [tokenizer.pad_token_id] * pad + row1]
    assert batch["labels"].tolist() == [labels0, [IGNORE_INDEX] * pad + labels1]
    assert batch["attention_mask"].tolist() == [[1] * len(row0), [0] * pad + [1] * len(row1)]
    assert batch["pixel_values"].shape == (2, 3, 336, 336)
    # Without counts every image gets the processor's 576 tokens.
    assert int((collator.batch(images, conversations)["input_ids"] == image).sum()) == 2 * 576


# ----------------------------------------------------------------------------------------------------
# One evaluator
# ----------------------------------------------------------------------------------------------------

def test_score_evaluates_in_eval_mode_and_restores_train_mode(processor, monkeypatch):
    model = torch.nn.Linear(2, 2).train()
    modes = []

    def fake_predict(model, collator, records, *args):
        modes.append((model.training, torch.is_grad_enabled()))
        return ["Red.", "yes", "3"]

    monkeypatch.setattr(evaluation, "predict", fake_predict)
    records = [{"image": "a.png", "type": t, "conversations": [{"from": "human", "value": "q\n<image>"},
                                                               {"from": "gpt", "value": a}]}
               for t, a in (("color", "red"), ("exist", "no"), ("count", "3"))]
    scores = evaluation.accuracy_of(model, processor, records, ".")
    assert modes == [(False, True)] and model.training  # predict itself runs under no_grad
    assert scores == {"all": 2 / 3, "color": 1.0, "count": 1.0, "exist": 0.0}
    rows = evaluation.evaluate(model, processor, records, ".", methods=("full",), progress=False, resamples=10)
    assert rows[0]["accuracy"] == scores and rows[0]["correct"] == [1, 0, 1]  # the same path as accuracy_of


def test_train_vlm_validates_with_the_shared_evaluator(tmp_path, monkeypatch):
    """Stage 2's validation is evaluation.accuracy_of (model in eval mode during it, train mode after),
    and the logged accuracy is that function's value for the saved model."""
    from autoselect.testbed import train_vlm

    data_dir, out = tmp_path / "data", tmp_path / "vlm"
    for split, count in (("train", 4), ("val", 3)):
        data.write_split(str(data_dir), split, count, seed=0, questions_per_image=2, progress=False)
    calls = []

    def spy(model, processor, records, image_root, **kw):
        scores = evaluation.accuracy_of(model, processor, records, image_root, **kw)
        calls.append((model.training, len(records), scores))
        return scores

    monkeypatch.setattr(train_vlm, "accuracy_of", spy)
    assert train_vlm.main(["--data", str(data_dir), "--out", str(out), "--vision-steps", "1", "--vision-batch-size",
                           "2", "--steps", "2", "--batch-size", "2", "--eval-every", "2", "--warmup", "1"]) == 0
    assert [(training, n) for training, n, _ in calls] == [(True, 6)]
    events = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    logged = [e for e in events if e["event"] == "eval"]
    assert logged[0]["val_accuracy"] == round(calls[0][2]["all"], 4)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(out)
    processor = transformers.AutoProcessor.from_pretrained(out)
    val = json.loads((data_dir / "val.json").read_text())
    assert evaluation.accuracy_of(model, processor, val, str(data_dir)) == calls[0][2]


# ----------------------------------------------------------------------------------------------------
# One training loop
# ----------------------------------------------------------------------------------------------------

def _toy(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 1)
    x = torch.randn(32, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1
    return model, x, y


def _loss(model, x, y, step):
    rows = slice((step * 8) % 32, (step * 8) % 32 + 8)
    return torch.nn.functional.mse_loss(model(x[rows]), y[rows])


def test_trainer_matches_a_hand_written_adamw_loop_with_its_schedule_and_clip():
    steps, warmup, lr, clip = 10, 3, 0.05, 0.5
    model, x, y = _toy()
    trainer = Trainer(model.parameters(), steps=steps, lr=lr, clip=clip, weight_decay=0.01, progress=False,
                      schedule=lambda s, base: learning_rate_at(s, steps, base, warmup))
    reference, _, _ = _toy()
    optimizer = torch.optim.AdamW(reference.parameters(), lr=lr, weight_decay=0.01)
    for step in trainer:
        loss = _loss(model, x, y, step)
        loss.backward()
        norm = trainer.step(step, loss.item())
        assert trainer.lr == learning_rate_at(step, steps, lr, warmup)
        assert all(p.grad is None for p in model.parameters())
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, steps, lr, warmup)
        _loss(reference, x, y, step).backward()
        assert float(torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)) == float(norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for a, b in zip(model.parameters(), reference.parameters()):
            assert torch.equal(a, b)
    assert trainer.running == loss.item()  # no smoothing: the last loss


def test_trainer_warmup_cosine_equals_lambda_lr_per_group():
    steps = 8
    model, x, y = _toy()
    groups = [{"params": [model.weight], "lr": 0.02}, {"params": [model.bias], "lr": 0.005}]
    trainer = Trainer(groups, steps=steps, lr=0.02, schedule=scaled(warmup_cosine(3, steps)), betas=(0.9, 0.98),
                      smoothing=0.9, progress=False)
    reference, _, _ = _toy()
    optimizer = torch.optim.AdamW([{"params": [reference.weight], "lr": 0.02},
                                   {"params": [reference.bias], "lr": 0.005}], weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(3, steps))
    running = None
    for step in trainer:
        loss = _loss(model, x, y, step)
        loss.backward()
        trainer.step(step, loss.item())
        assert [g["lr"] for g in trainer.optimizer.param_groups] == [g["lr"] for g in optimizer.param_groups]
        value = _loss(reference, x, y, step)
        value.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        running = value.item() if running is None else 0.9 * running + 0.1 * value.item()
        assert trainer.running == running
    assert torch.equal(model.weight, reference.weight) and torch.equal(model.bias, reference.bias)
    assert warmup_cosine(3, steps)(0) == pytest.approx(1 / 3 * 0.5 * (1 + math.cos(0)))


def test_trainer_clips_the_gradient_the_optimizer_sees():
    model, x, y = _toy()
    trainer = Trainer(model.parameters(), steps=1, lr=0.1, clip=0.25, progress=False, schedule=lambda s, base: base)
    seen = []
    step = trainer.optimizer.step

    def spy(*args, **kw):
        seen.append(float(torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))))
        return step(*args, **kw)

    trainer.optimizer.step = spy
    (_loss(model, x, y, 0) * 100).backward()
    norm = float(trainer.step(0))
    assert norm > 1 and seen == [pytest.approx(0.25, rel=1e-5)]


def test_trainer_tracks_the_best_and_stops_after_patience():
    trainer = Trainer(torch.nn.Linear(1, 1).parameters(), steps=10, lr=0.1, schedule=lambda s, b: b, patience=2,
                      progress=False)
    results = [trainer.evaluate(step, value) for step, value in ((1, 3.0), (2, 2.0), (3, 2.5))]
    assert [r["improved"] for r in results] == [True, True, False] and not any(r["stop"] for r in results)
    assert trainer.evaluate(4, lambda: 2.0, can_stop=False)["stop"] is False  # a tie is no improvement
    assert trainer.state() == {"best": 2.0, "best_step": 2, "bad_evaluations": 2}
    assert trainer.evaluate(5, 2.1)["stop"] is True
    assert trainer.evaluate(6, 1.0) == {"value": 1.0, "improved": True, "best": 1.0, "best_step": 6, "stop": False}
    larger = Trainer(torch.nn.Linear(1, 1).parameters(), steps=10, lr=0.1, schedule=lambda s, b: b, maximize=True,
                     progress=False)
    assert [larger.evaluate(s, v)["improved"] for s, v in ((1, 0.5), (2, 0.4), (3, 0.7))] == [True, False, True]
    assert larger.best == 0.7 and larger.best_step == 3
    exact = Trainer(torch.nn.Linear(1, 1).parameters(), steps=10, lr=0.1, schedule=lambda s, b: b, patience=2,
                    progress=False)
    assert [exact.evaluate(s, v)["stop"] for s, v in ((1, 1.0), (2, 2.0), (3, 3.0))] == [False, False, True]
    never = Trainer(torch.nn.Linear(1, 1).parameters(), steps=10, lr=0.1, schedule=lambda s, b: b, progress=False)
    assert not any(never.evaluate(s, 5.0 + s)["stop"] for s in range(5))  # patience 0: never stops


def test_trainer_save_and_resume_equals_an_uninterrupted_run(tmp_path):
    steps = 8

    def make(start=0, log=None, append=False):
        model, x, y = _toy()
        trainer = Trainer(model.parameters(), steps=steps, lr=0.05, progress=False, start=start, log=log,
                          append=append, schedule=lambda s, base: learning_rate_at(s, steps, base, 2), patience=3)
        return model, x, y, trainer

    def run(model, x, y, trainer, stop=None):
        for step in trainer:
            loss = _loss(model, x, y, step)
            loss.backward()
            trainer.step(step, loss.item())
            trainer.evaluate(step + 1, loss.item())
            trainer.log({"step": step + 1, "loss": loss.item(), "lr": trainer.lr})
            if step + 1 == stop:
                return

    straight = make(log=tmp_path / "straight.jsonl")
    run(*straight)
    first = make(log=tmp_path / "resumed.jsonl")
    run(*first, stop=3)
    first[3].save(tmp_path / "checkpoint-3", state={"step": 3, **first[3].state()})
    weights = {k: v.clone() for k, v in first[0].state_dict().items()}
    second = make(start=3, log=tmp_path / "resumed.jsonl", append=True)
    second[0].load_state_dict(weights)
    state = second[3].restore(tmp_path / "checkpoint-3")
    assert state["step"] == 3 and "param_groups" in state
    second[3].load_state(state)
    run(*second)
    for a, b in zip(straight[0].parameters(), second[0].parameters()):
        assert torch.equal(a, b)
    assert second[3].state() == straight[3].state()
    assert (tmp_path / "resumed.jsonl").read_text() == (tmp_path / "straight.jsonl").read_text()
