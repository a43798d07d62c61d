"""The testbed's tiny VLM: built offline from configs, real transformers classes, LLaVA-1.5 shapes."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the tiny VLM needs transformers (in the [test] extra)")

from autoselect.testbed import data, vlm  # noqa: E402
from autoselect.conversation import IGNORE_INDEX  # noqa: E402
from autoselect.testbed.train_vlm import main as train_main  # noqa: E402
from autoselect.training.data import ConversationCollator  # noqa: E402

SMALL = dict(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=1, text_heads=2)


@pytest.fixture(scope="module")
def processor():
    return vlm.build_processor()


def test_tokenizer_is_word_level_over_the_vocabulary(processor):
    tokenizer = processor.tokenizer
    text = vlm.prompt("How many crosses are there?", "2")
    tokens = tokenizer.tokenize(text)
    assert tokens == ["user", ":", "how", "many", "crosses", "are", "there", "?", "<image>", "assistant", ":", "2",
                      "</s>"]
    assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"]
    for word in data.vocabulary():
        assert tokenizer.convert_tokens_to_ids(word) != tokenizer.unk_token_id, word


def test_processor_expands_image_to_576_tokens(processor):
    scene = next(data.generate("val", 1))[1]
    batch = processor(images=[data.render(scene)], text=[vlm.prompt("What color is the circle?")], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((batch["input_ids"] == image_id).sum()) == 576
    assert batch["pixel_values"].shape == (1, 3, 336, 336)


def test_model_forward_gives_576_visual_tokens(processor):
    model = vlm.build_model(seed=0, tokenizer=processor.tokenizer, **SMALL).eval()
    assert isinstance(model, transformers.LlavaForConditionalGeneration)
    scenes = [s for _, s, _ in data.generate("val", 2)]
    batch = processor(images=[data.render(s) for s in scenes],
                      text=[vlm.prompt("What color is the circle?"), vlm.prompt("Is there a red cross in the image?")],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        features = model.get_image_features(pixel_values=batch["pixel_values"])
        features = features.pooler_output if hasattr(features, "pooler_output") else features
        features = torch.stack(list(features)) if isinstance(features, (list, tuple)) else features
        assert features.shape[-2:] == (576, 32)
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()


def test_build_is_deterministic(processor):
    a = vlm.build_model(seed=3, tokenizer=processor.tokenizer, **SMALL)
    b = vlm.build_model(seed=3, tokenizer=processor.tokenizer, **SMALL)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_collator_labels_only_answers(processor):
    collator = ConversationCollator(processor, ".")
    ids, labels = collator.encode_turns([(vlm.image_question("What color is the circle?"), "red"),
                                         ("How many squares are there?", "2")], vlm.NUM_PATCHES)
    assert ids.count(collator.image_token_id) == 576  # the image comes once, with the first question
    supervised = [processor.tokenizer.convert_ids_to_tokens(t) for t in labels if t != IGNORE_INDEX]
    assert supervised == ["red", "</s>", "2", "</s>"]
    assert len(ids) == len(labels)


def test_train_vlm_smoke(tmp_path):
    """A few steps of the documented training command: log written, model and processor reload offline."""
    data_dir, out = tmp_path / "data", tmp_path / "vlm"
    for split, count in (("train", 6), ("val", 3)):
        data.write_split(str(data_dir), split, count, seed=0, questions_per_image=2, progress=False)
    assert train_main(["--data", str(data_dir), "--out", str(out), "--vision-steps", "2", "--vision-batch-size", "2",
                       "--steps", "3", "--batch-size", "2", "--eval-every", "3", "--warmup", "1"]) == 0
    events = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "end"
    assert [e["step"] for e in events if e["event"] == "vision"] == [2]
    assert any(e["event"] == "eval" for e in events)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(out)
    processor = transformers.AutoProcessor.from_pretrained(out)
    assert model.config.image_seq_length == 576
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id


def test_stage1_patch_targets_follow_the_scene():
    """Stage 1 labels: each object's colour and shape on its patches, its centre patch marked once,
    background 0 elsewhere, and every patch's own row and column (row-major 24 x 24)."""
    from autoselect.testbed.train_vlm import patch_targets

    scenes = [s for _, s, _ in data.generate("val", 8, seed=5)]
    targets = patch_targets(scenes)
    assert {name: tuple(t.shape) for name, t in targets.items()} == {name: (8, 576) for name in
                                                                    ("color", "shape", "centre", "row", "col")}
    colors, shapes = list(data.COLORS), list(data.SHAPES)
    for b, scene in enumerate(scenes):
        owner = torch.as_tensor(data.patch_labels(scene))
        assert torch.equal(targets["color"][b] > 0, owner > 0) and torch.equal(targets["shape"][b] > 0, owner > 0)
        for index, obj in enumerate(scene.objects):
            mine = owner == index + 1
            assert (targets["color"][b][mine] == colors.index(obj.color) + 1).all()
            assert (targets["shape"][b][mine] == shapes.index(obj.shape) + 1).all()
            assert targets["centre"][b][(obj.y // 14) * 24 + obj.x // 14] == 1
        assert int(targets["centre"][b].sum()) == len(scene.objects)
        assert targets["row"][b][24 * 7 + 3] == 7 and targets["col"][b][24 * 7 + 3] == 3


def test_curriculum_shows_every_object_patch_and_a_fraction_of_the_background():
    from autoselect.testbed.train_vlm import background_fraction, curriculum_tokens

    assert background_fraction(1, 100, 0.05, 0.8, 0.3) == 0.05
    assert background_fraction(30, 100, 0.05, 0.8, 0.3) == 0.05
    assert abs(background_fraction(55, 100, 0.05, 0.8, 0.3) - 0.525) < 1e-9
    assert background_fraction(80, 100, 0.05, 0.8, 0.3) == 1.0 == background_fraction(100, 100, 0.05, 0.8, 0.3)
    generator = torch.Generator().manual_seed(0)
    for _, scene, _ in data.generate("val", 6, seed=3):
        owner = torch.as_tensor(data.patch_labels(scene))
        shown = curriculum_tokens(scene, 0.1, generator)
        assert torch.equal(shown, shown.sort().values) and len(set(shown.tolist())) == len(shown)
        assert set((owner > 0).nonzero().flatten().tolist()) <= set(shown.tolist())
        background = int((owner[shown] == 0).sum())
        assert 0.02 * int((owner == 0).sum()) < background < 0.2 * int((owner == 0).sum())
        assert torch.equal(curriculum_tokens(scene, 1.0, generator), torch.arange(576))


def test_stage1_only_then_stage2_from_its_tower(tmp_path):
    """--steps 0 saves the stage 1 model; --tower-from starts stage 2 from its tower, which stays frozen."""
    data_dir = tmp_path / "data"
    for split, count in (("train", 4), ("val", 2)):
        data.write_split(str(data_dir), split, count, seed=0, questions_per_image=2, progress=False)
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    assert train_main(["--data", str(data_dir), "--out", str(stage1), "--vision-steps", "2", "--vision-batch-size", "2",
                       "--steps", "0"]) == 0
    assert train_main(["--data", str(data_dir), "--out", str(stage2), "--tower-from", str(stage1), "--vision-steps", "0",
                       "--steps", "2", "--batch-size", "2", "--eval-every", "2", "--warmup", "1", "--seed", "1"]) == 0
    first = transformers.LlavaForConditionalGeneration.from_pretrained(stage1).model.vision_tower.state_dict()
    second = transformers.LlavaForConditionalGeneration.from_pretrained(stage2).model.vision_tower.state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    fresh = vlm.build_model(seed=1).model.vision_tower.state_dict()
    assert not all(torch.equal(first[k], fresh[k]) for k in first)
    # --init-from continues from every weight: stage 2's starting loss is that model's, not a fresh one's
    stage3 = tmp_path / "stage3"
    assert train_main(["--data", str(data_dir), "--out", str(stage3), "--init-from", str(stage2), "--vision-steps", "0",
                       "--steps", "1", "--batch-size", "2", "--eval-every", "1", "--warmup", "1", "--lr", "0"]) == 0
    before = transformers.LlavaForConditionalGeneration.from_pretrained(stage2).state_dict()
    after = transformers.LlavaForConditionalGeneration.from_pretrained(stage3).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # lr 0: nothing moved, everything loaded
    # both: every weight from --init-from, then the tower from --tower-from (another stage 1's)
    other, stage4 = tmp_path / "stage1-other", tmp_path / "stage4"
    assert train_main(["--data", str(data_dir), "--out", str(other), "--vision-steps", "2", "--vision-batch-size", "2",
                       "--steps", "0", "--seed", "2"]) == 0
    assert train_main(["--data", str(data_dir), "--out", str(stage4), "--init-from", str(stage2), "--tower-from",
                       str(other), "--vision-steps", "0", "--steps", "1", "--batch-size", "2", "--eval-every", "1",
                       "--warmup", "1", "--lr", "0"]) == 0
    tower = transformers.LlavaForConditionalGeneration.from_pretrained(other).state_dict()
    merged = transformers.LlavaForConditionalGeneration.from_pretrained(stage4).state_dict()
    assert not all(torch.equal(tower[k], before[k]) for k in before if "vision_tower" in k)
    assert all(torch.equal(merged[k], (tower if "vision_tower" in k else before)[k]) for k in before)
