"""The trainer (`autoselect train`) on a tiny frozen VLM: the VLM does not change, the loss goes down,
the budget holds, resume equals an uninterrupted run, and 2 processes (gloo) equal 1 on the doubled batch."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="the trainer needs transformers (in the [test] extra)")

from autoselect import AutoSelector  # noqa: E402
from autoselect.testbed import data  # noqa: E402
from autoselect.training import ConversationCollator, IGNORE_INDEX, load_records  # noqa: E402
from autoselect.training.trainer import build_parser, train  # noqa: E402

from conftest import FIRST_RELEASE_FLAGS, save_tiny_testbed_vlm  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    data.write_split(str(root / "data"), "train", 16, seed=0, questions_per_image=1, progress=False)
    save_tiny_testbed_vlm(root / "vlm", seed=0)
    return root


def run(setup, out, *extra):
    args = build_parser().parse_args(["--model", str(setup / "vlm"), "--data", str(setup / "data" / "train.json"),
                                      "--out", str(out), "--keep", "16", "--batch-size", "4", "--scorer-hidden", "16",
                                      *FIRST_RELEASE_FLAGS, "--denoiser-heads", "2", "--denoiser-head-dim", "8",
                                      "--memory-slots", "4",
                                      "--stats-images", "8", "--warmup", "2", "--lr", "3e-3", "--log-every", "1",
                                      "--no-progress", "--device", "cpu", *extra])
    return train(args)


def log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_collator_labels_answers_only(setup):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(setup / "vlm", local_files_only=True)
    records = load_records(str(setup / "data" / "train.json"))[:2]
    batch = ConversationCollator(processor, str(setup / "data"))(records)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert ((batch["input_ids"] == image_id).sum(-1) == 576).all()
    for row, record in enumerate(records):
        supervised = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        expected = processor.tokenizer(record["conversations"][1]["value"], add_special_tokens=False)["input_ids"]
        assert supervised == expected + [processor.tokenizer.eos_token_id]
    assert batch["pixel_values"].shape == (2, 3, 336, 336)


def test_training_keeps_vlm_frozen_lowers_loss_and_keeps_budget(setup, tmp_path):
    summary = run(setup, tmp_path / "a", "--steps", "30", "--check-frozen")  # raises if a VLM weight changed
    entries = log(tmp_path / "a")
    assert len(entries) == 30
    first = sum(e["loss"] for e in entries[:5]) / 5
    last = sum(e["loss"] for e in entries[-5:]) / 5
    assert last < first, (first, last)
    for e in entries:
        assert abs(e["alpha_sum_min"] - 16) < 1e-3 * 16 and abs(e["alpha_sum_max"] - 16) < 1e-3 * 16
    assert entries[0]["temperature"] == 1.0 and abs(entries[-1]["temperature"] - 0.05) < 1e-9
    selector = AutoSelector.from_pretrained(tmp_path / "a" / "selector")
    assert selector.config["placement"] == "projector_input"  # LLaVA's default: before the frozen projector
    assert int(selector.token_count) == 8 * 576
    assert torch.equal(selector.scorer.fc1.weight, summary["selector"].scorer.fc1.weight)


def test_resume_gives_the_same_steps(setup, tmp_path):
    straight = run(setup, tmp_path / "straight", "--steps", "4")["selector"]
    run(setup, tmp_path / "resumed", "--steps", "4", "--save-every", "2")
    # Throw away the end of the run, resume from step 2.
    for name in ("selector", "checkpoint-4", "train_log.jsonl"):
        target = tmp_path / "resumed" / name
        subprocess.run(["rm", "-rf", str(target)], check=True)
    resumed = run(setup, tmp_path / "resumed", "--steps", "4", "--resume", "latest")["selector"]
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert [e["step"] for e in log(tmp_path / "resumed")] == [3, 4]


def test_two_processes_equal_one_on_the_doubled_batch(setup, tmp_path):
    single = run(setup, tmp_path / "single", "--steps", "2", "--batch-size", "4")["selector"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
               "-m", "autoselect", "train", "--model", str(setup / "vlm"), "--data",
               str(setup / "data" / "train.json"), "--out", str(tmp_path / "ddp"), "--keep", "16", "--batch-size", "2",
               "--scorer-hidden", "16",
               *FIRST_RELEASE_FLAGS, "--denoiser-heads", "2", "--denoiser-head-dim", "8", "--memory-slots", "4",
               "--stats-images", "8", "--warmup", "2", "--lr", "3e-3", "--log-every", "1", "--no-progress",
               "--device", "cpu", "--steps", "2"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ddp = AutoSelector.from_pretrained(tmp_path / "ddp" / "selector")
    for (name, a), (_, b) in zip(single.state_dict().items(), ddp.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert [e["step"] for e in log(tmp_path / "ddp")] == [1, 2]
