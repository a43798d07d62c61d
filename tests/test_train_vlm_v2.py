"""The testbed v2 tiny VLM (vlm version 2, train_vlm --version 2): tokenizer, image-first prompt, sizes,
stage 1's digit head, caption mixing and the recall turns in stage 2, and resuming an interrupted run to
the same weights."""

import collections
import json
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers", reason="the tiny VLM needs transformers (in the [test] extra)")

from autoselect.testbed import data_v2, vlm  # noqa: E402
from autoselect.testbed import train_vlm  # noqa: E402

TINY = dict(vision_hidden=32, vision_layers=1, vision_heads=1, text_hidden=64, text_layers=1, text_heads=1)
TINY_ARGS = ["--version", "2", "--sizes", json.dumps(TINY), "--threads", "1"]


@pytest.fixture(scope="module")
def v2_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("v2data")
    for split, count in (("train", 8), ("val", 3)):
        data_v2.write_split(str(folder), split, count, seed=0, questions_per_image=3, progress=False)
    return folder


def events_of(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_v2_tokenizer_covers_every_word_of_v2_records(v2_data):
    tokenizer = vlm.build_tokenizer(version=2)
    v1 = vlm.build_tokenizer()
    assert all(tokenizer.convert_tokens_to_ids(w) == i for w, i in v1.get_vocab().items())  # v1's ids kept
    texts = []
    for name in ("train", "train_captions", "val", "val_captions"):
        for record in json.loads((v2_data / f"{name}.json").read_text()):
            texts += [turn["value"] for turn in record["conversations"]]
    rng = __import__("numpy").random.default_rng(0)
    for _, scene, _ in data_v2.generate("val", 20, seed=4):
        texts += [f"{q.text} {q.answer}" for q in data_v2.make_questions(scene, rng, 7)] + [data_v2.caption(scene)]
    assert any("digit" in t for t in texts) and any("left of" in t or "above" in t for t in texts)
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text


def test_v2_prompt_puts_the_image_first_and_v1_keeps_it_after():
    v2 = vlm.prompt("What digit is on the red square?", "7", version=2)
    assert v2 == "USER: <image>\nWhat digit is on the red square? ASSISTANT: 7</s>"
    assert vlm.prompt("What color is the circle?") == "USER: What color is the circle?\n<image> ASSISTANT:"
    tokens = vlm.build_tokenizer(version=2).tokenize(v2)
    assert tokens.index("<image>") < tokens.index("digit")
    # train_vlm's stage 2 builds its first turns through the same function
    assert vlm.image_question("q", 2).startswith("<image>") and vlm.image_question("q").endswith("<image>")


def test_v2_model_sizes():
    config = vlm.build_config(version=2)
    text, vision = config.text_config, config.vision_config
    assert text.hidden_size // text.num_attention_heads in (32, 64)
    assert config.image_seq_length == vlm.NUM_PATCHES == 576
    assert (vision.image_size, vision.patch_size) == (336, 14)
    assert text.vocab_size == len(vlm.build_tokenizer(version=2))
    assert vlm.build_config().text_config.hidden_size == vlm.DEFAULT_SIZES["text_hidden"]  # v1 unchanged
    with pytest.raises(ValueError):
        vlm.build_config(version=2, text_width=3)


def test_rope_theta_is_a_size():
    """--sizes '{"rope_theta": ...}' reaches the language model's rotary frequencies (only the slowest
    pairs stay position-free over 576 image tokens, so the base is a model choice); both versions default
    to Llama's 10000, the base the shipped v1 weights were trained with."""
    for version in vlm.VERSIONS:
        assert vlm.build_config(version=version).text_config.rope_parameters["rope_theta"] == 10000.0
    slow = vlm.build_model(version=2, rope_theta=1e6).model.language_model.rotary_emb.inv_freq
    default = vlm.build_model(version=2).model.language_model.rotary_emb.inv_freq
    half = default.numel()
    assert torch.allclose(slow, 1e6 ** (-torch.arange(half, dtype=torch.float32) / half))
    assert torch.allclose(default, 1e4 ** (-torch.arange(half, dtype=torch.float32) / half))


def test_text_head_dim_is_a_size():
    """--sizes '{"text_head_dim": 64}' widens the language model's heads at the same width (4 heads of 64
    in 128: the projections 128 -> 256 -> 128); None (both versions' default) keeps width / heads."""
    for version in vlm.VERSIONS:
        config = vlm.build_config(version=version).text_config
        assert config.head_dim == config.hidden_size // config.num_attention_heads
    model = vlm.build_model(version=2, text_heads=4, text_head_dim=64)
    attention = model.model.language_model.layers[0].self_attn
    assert model.config.text_config.head_dim == 64 and attention.head_dim == 64
    assert tuple(attention.q_proj.weight.shape) == (256, 128) and tuple(attention.o_proj.weight.shape) == (128, 256)
    assert model.model.language_model.rotary_emb.inv_freq.numel() == 32
    ids = torch.tensor([[2, 5, 6]])
    assert model.model.language_model(input_ids=ids).last_hidden_state.shape == (1, 3, 128)


def test_stage1_v2_learns_the_digit_marks(v2_data, tmp_path):
    """Stage 1 on v2 data: a "mark" head (0 = none, 1..10 = digit) beside v1's, its accuracy logged."""
    scenes = [scene for _, scene in train_vlm.load_scenes(str(v2_data), "train", 2)]
    targets = train_vlm.patch_targets(scenes, version=2)
    assert set(targets) == {"color", "shape", "centre", "row", "col", "mark"}
    assert torch.equal(targets["mark"], torch.stack([torch.as_tensor(data_v2.mark_patches(s)) for s in scenes]))
    assert int(targets["mark"].max()) <= 10 and (targets["mark"] > 0).any()
    out = tmp_path / "stage1"
    assert train_vlm.main(["--data", str(v2_data), "--out", str(out), "--vision-steps", "2", "--vision-batch-size", "2",
                           "--steps", "0", *TINY_ARGS]) == 0
    evaluation = [e for e in events_of(out) if e["event"] == "vision_eval"]
    assert len(evaluation) == 1 and {"mark", "mark_none", "color", "shape"} <= set(evaluation[0])
    model = transformers.LlavaForConditionalGeneration.from_pretrained(out)
    assert model.config.text_config.hidden_size == 64


def test_stage2_mixes_in_captions_at_the_configured_fraction(v2_data, tmp_path):
    args = train_vlm.resolve_defaults(train_vlm.build_parser().parse_args(
        ["--data", str(v2_data), "--out", str(tmp_path / "run"), "--vision-steps", "0", "--batch-size", "8",
         *TINY_ARGS]))
    assert (args.caption_fraction, args.full_from, args.loss_average) == (0.2, 0.5, "samples")  # v2's defaults
    run = train_vlm.setup(args)
    captions = {text for _, text in run.captions.values()}
    seen = total = 0
    for step in range(1, 41):
        images, conversations, paths = train_vlm.stage2_batch(run, step)
        for path, turns in zip(paths, conversations):
            assert turns[0][0].startswith("<image>\n")  # image first
            if turns[0][1] in captions:
                assert turns == [("<image>\nWhat is in the image?", run.captions[path][1])]
                seen += 1
            total += 1
    assert 0.12 < seen / total < 0.28, seen / total
    # the per-sample loss weighs every sample alike: a long caption counts as much as a one-word answer
    logits = torch.zeros(2, 5, 3)
    labels = torch.tensor([[-100, 1, 1, 1, 1], [-100, -100, -100, -100, 2]])
    logits[0, :, 1] = 10.0
    expected = (torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:]) +
                torch.nn.functional.cross_entropy(logits[1, 3:4], labels[1, 4:])) / 2
    assert torch.allclose(train_vlm.per_sample_loss(logits, labels), expected)


def test_recall_steps_name_each_unique_shape_with_its_colour(v2_data, tmp_path):
    args = train_vlm.resolve_defaults(train_vlm.build_parser().parse_args(
        ["--data", str(v2_data), "--out", str(tmp_path / "run"), "--vision-steps", "0", "--batch-size", "8",
         "--recall-steps", "2", "--caption-fraction", "0", "--turns", "2", *TINY_ARGS]))
    run = train_vlm.setup(args)
    recalled = 0
    for step in (1, 2, 3):
        _, conversations, paths = train_vlm.stage2_batch(run, step)
        for path, turns in zip(paths, conversations):
            scene = run.train_scenes[path]
            shapes = [o.shape for o in scene.objects]
            unique = {o.shape: o.color for o in scene.objects if shapes.count(o.shape) == 1}
            assert turns[0][0].startswith("<image>\n")
            if step <= 2 and unique:  # one turn: every unique shape once, each followed by its colour
                assert len(turns) == 1 and turns[0][0] == "<image>\n" + train_vlm.RECALL_QUESTION
                words = turns[0][1].split()
                assert sorted(words[0::2]) == sorted(unique) and words[1::2] == [unique[w] for w in words[0::2]]
                recalled += 1
            else:  # the data's questions (and the generated ones), --turns of them
                assert len(turns) == 2 and all(q.endswith("?") for q, _ in turns)
    assert recalled >= 8
    # --recall-fraction: after the recall steps, about that share of the samples is a recall turn
    args.recall_fraction = 0.5
    kinds = [turns[0][0] == "<image>\n" + train_vlm.RECALL_QUESTION
             for step in range(3, 23) for turns in train_vlm.stage2_batch(run, step)[1]]
    assert 0.3 < sum(kinds) / len(kinds) < 0.6, sum(kinds) / len(kinds)
    # --recall-as questions: the same objects, one colour question each
    spatial = 0
    for path, scene in run.train_scenes.items():
        shapes = [o.shape for o in scene.objects]
        unique = {o.shape: o.color for o in scene.objects if shapes.count(o.shape) == 1}
        turns = train_vlm.recall_turns(scene, np.random.default_rng(0), "questions")
        assert sorted(turns) == sorted((f"What color is the {s}?", c) for s, c in unique.items())
        # --recall-as all: also the shape of each unique colour and the digit on each marked named object
        colours = [o.color for o in scene.objects]
        expected = [(f"What color is the {s}?", c) for s, c in unique.items()]
        expected += [(f"What shape is the {o.color} object?", o.shape) for o in scene.objects
                     if colours.count(o.color) == 1]
        expected += [(f"What digit is on the {o.color} {o.shape}?", o.mark) for o in scene.objects if o.mark is not None
                     and sum((p.color, p.shape) == (o.color, o.shape) for p in scene.objects) == 1]
        assert sorted(train_vlm.recall_turns(scene, np.random.default_rng(0), "all")) == sorted(expected)
        # --recall-as every: also each named object's side on each axis where it lies in one half, and the
        # colour of the one object beside a named one (the generator's location and relation questions)
        named = [o for o in scene.objects if sum((p.color, p.shape) == (o.color, o.shape) for p in scene.objects) == 1]
        for o in named:
            for axis, low, high, where in (("x", "left", "right", "on the left or the right"),
                                           ("y", "top", "bottom", "at the top or the bottom")):
                centre = o.x if axis == "x" else o.y
                middle = data_v2.IMAGE_SIZE / 2
                side = low if centre + o.size / 2 < middle else high if centre - o.size / 2 > middle else None
                if side:
                    expected.append((f"Is the {o.color} {o.shape} {where}?", side))
        for anchor in named:
            for direction in data_v2.DIRECTIONS:
                near = [o for o in scene.objects if o is not anchor and data_v2._beside(o, anchor, direction)]
                if len(near) == 1 and data_v2.relation(near[0], anchor) == direction:
                    expected.append((f"What color is the object {direction} the {anchor.color} {anchor.shape}?",
                                     near[0].color))
        every = train_vlm.recall_turns(scene, np.random.default_rng(0), "every")
        assert sorted(every) == sorted(expected)
        # --recall-as every+shape: also the side of each unique shape, named by its shape alone
        for o in scene.objects:
            if shapes.count(o.shape) == 1:
                middle = data_v2.IMAGE_SIZE / 2
                for axis, low, high, where in (("x", "left", "right", "on the left or the right"),
                                               ("y", "top", "bottom", "at the top or the bottom")):
                    centre = o.x if axis == "x" else o.y
                    side = low if centre + o.size / 2 < middle else high if centre - o.size / 2 > middle else None
                    if side:
                        expected.append((f"Is the {o.shape} {where}?", side))
                        spatial += 1
        assert sorted(train_vlm.recall_turns(scene, np.random.default_rng(0), "every+shape")) == sorted(expected)
        spatial += sum(q.startswith(("Is the", "What color is the object")) for q, _ in every)
    marks = [q for scene in run.train_scenes.values()
             for q, _ in train_vlm.recall_turns(scene, np.random.default_rng(0), "all") if q.startswith("What digit")]
    assert marks and spatial  # the fixture's scenes have marked objects and objects in one half


def test_recall_every_count_adds_the_generators_count_questions(v2_data):
    """--recall-as every+count: every's turns plus the count of all objects, of each colour and of each
    shape the scene has, each answered as the generator answers that question."""
    from autoselect.testbed.data import plural

    scenes = dict(train_vlm.load_scenes(str(v2_data), "train", 2))
    asked = 0
    for scene in scenes.values():
        every = train_vlm.recall_turns(scene, np.random.default_rng(0), "every")
        turns = train_vlm.recall_turns(scene, np.random.default_rng(0), "every+count")
        counts = [t for t in turns if t[0].startswith("How many")]
        assert sorted(t for t in turns if not t[0].startswith("How many")) == sorted(every)
        colours, shapes = [o.color for o in scene.objects], [o.shape for o in scene.objects]
        assert len(counts) == 1 + len(set(colours)) + len(set(shapes))
        assert ("How many objects are there?", str(len(scene.objects))) in counts
        assert (f"How many {colours[0]} objects are there?", str(colours.count(colours[0]))) in counts
        assert (f"How many {plural(shapes[-1])} are there?", str(shapes.count(shapes[-1]))) in counts
        for seed in range(6):  # the generator's own count questions about what the scene has
            for question in data_v2.make_questions(scene, np.random.default_rng(seed), 1, types=("count",)):
                if question.answer != "0":
                    assert (question.text, question.answer) in counts
                    asked += 1
    assert asked >= 20


def test_recall_every_relation_adds_the_generators_yes_no_relations(v2_data, monkeypatch):
    """--recall-as every+relation: every's turns plus related pairs' yes/no questions asked both ways, one
    "yes" and one "no" per ordered pair, at most RECALL_RELATION_PAIRS pairs; with the cap lifted, every
    yes/no relation question the generator asks of the scene is among them with the same answer."""
    scenes = dict(train_vlm.load_scenes(str(v2_data), "train", 2))
    capped = 0
    for scene in scenes.values():
        turns = train_vlm.recall_turns(scene, np.random.default_rng(0), "every+relation")
        yes_no = [t for t in turns if t[1] in ("yes", "no")]
        assert len(yes_no) <= 2 * train_vlm.RECALL_RELATION_PAIRS
        capped += len(yes_no) == 2 * train_vlm.RECALL_RELATION_PAIRS
    assert capped  # the fixture has scenes with more related pairs than the cap
    monkeypatch.setattr(train_vlm, "RECALL_RELATION_PAIRS", 1000)
    asked = paired = 0
    for scene in scenes.values():
        every = train_vlm.recall_turns(scene, np.random.default_rng(0), "every")
        turns = train_vlm.recall_turns(scene, np.random.default_rng(0), "every+relation")
        yes_no = [t for t in turns if t[1] in ("yes", "no")]
        assert sorted(t for t in turns if t not in yes_no) == sorted(every)
        assert sum(a == "yes" for _, a in yes_no) == sum(a == "no" for _, a in yes_no)
        paired += len(yes_no)
        for seed in range(8):  # the generator's own yes/no relation questions about the scene
            for question in data_v2.make_questions(scene, np.random.default_rng(seed), 2, types=("relation",)):
                if question.answer in ("yes", "no"):
                    assert (question.text, question.answer) in yes_no
                    asked += 1
    assert asked >= 10 and paired >= 20


def test_recall_every_relation_order_asks_each_pairs_order_as_a_word(v2_data):
    """--recall-as every+relation+order: every+relation's turns plus, for each asked pair, the order as a
    word ("Is the red star left or right of the blue circle?" -> "left"), which agrees with the pair's
    "yes" question and with data_v2.relation; both axes occur."""
    scenes = dict(train_vlm.load_scenes(str(v2_data), "train", 2))
    words = collections.Counter()
    for scene in scenes.values():
        plain = train_vlm.recall_turns(scene, np.random.default_rng(0), "every+relation")
        turns = train_vlm.recall_turns(scene, np.random.default_rng(0), "every+relation+order")
        order = [t for t in turns if " or right of the " in t[0] or " or below the " in t[0]]
        assert sorted(t for t in turns if t not in order) == sorted(plain)
        named = {f"{o.color} {o.shape}": o for o in data_v2._unique(scene.objects)}
        for question, word in order:
            found = re.fullmatch(r"Is the (\w+ \w+) (left or right of|above or below) the (\w+ \w+)\?", question)
            assert found, question
            a, b = named[found.group(1)], named[found.group(3)]
            actual = data_v2.relation(a, b)
            assert train_vlm.ORDER_WORDS[actual] == word
            assert (found.group(2) == "left or right of") == (actual in ("left of", "right of"))
            assert (f"Is the {found.group(1)} {actual} the {found.group(3)}?", "yes") in turns
            words[word] += 1
        assert len(order) == sum(answer == "yes" for _, answer in plain)  # one per asked pair
    assert words["left"] + words["right"] > 0 and words["above"] + words["below"] > 0, words


def test_insert_layer_starts_as_the_saved_model(v2_data, tmp_path):
    """--insert-layer: the deeper model loads the saved layers around a new one whose output projections
    are zero, so it computes exactly the saved model's logits; the saved layers keep their weights at
    their shifted indices; a model without the extra layer is refused."""
    processor = vlm.build_processor(version=2)
    source = vlm.build_model(seed=3, tokenizer=processor.tokenizer, version=2, **{**TINY, "text_layers": 2}).eval()
    image = torch.full((1, 578), source.config.image_token_index)
    image[0, :1], image[0, -1] = 5, 6
    pixels = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        expected = source(input_ids=image, pixel_values=pixels).logits
    for at in (0, 1, 2):
        deeper = vlm.build_model(seed=4, tokenizer=processor.tokenizer, version=2, **{**TINY, "text_layers": 3}).eval()
        deeper.load_state_dict(train_vlm.with_inserted_layer(source.state_dict(), deeper.state_dict(), at))
        layers = deeper.model.language_model.layers
        kept = [i for i in range(3) if i != at]
        for saved, index in zip(source.model.language_model.layers, kept):
            assert torch.equal(saved.self_attn.q_proj.weight, layers[index].self_attn.q_proj.weight)
        assert not torch.equal(layers[at].self_attn.q_proj.weight, layers[kept[0]].self_attn.q_proj.weight)
        with torch.no_grad():
            got = deeper(input_ids=image, pixel_values=pixels).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        with torch.no_grad():  # the new layer's output projections are what keep it silent
            layers[at].self_attn.o_proj.weight.normal_(0, 0.2)
            assert not torch.allclose(deeper(input_ids=image, pixel_values=pixels).logits, expected, atol=1e-3)
    same = vlm.build_model(seed=4, tokenizer=processor.tokenizer, version=2, **{**TINY, "text_layers": 2})
    with pytest.raises(ValueError, match="one more language-model layer"):
        train_vlm.with_inserted_layer(source.state_dict(), same.state_dict(), 0)
    with pytest.raises(ValueError, match="out of range"):
        train_vlm.with_inserted_layer(source.state_dict(), deeper.state_dict(), 3)
    # through the command: --init-from a saved model, --steps 0 saves the deeper model as loaded
    saved, out = tmp_path / "saved", tmp_path / "deeper"
    source.save_pretrained(saved)
    processor.save_pretrained(saved)
    sizes = json.dumps({**TINY, "text_layers": 3})
    assert train_vlm.main(["--version", "2", "--sizes", sizes, "--threads", "1", "--data", str(v2_data),
                           "--out", str(out), "--vision-steps", "0", "--steps", "0", "--init-from", str(saved),
                           "--insert-layer", "1"]) == 0
    with pytest.raises(SystemExit):  # without --init-from there are no saved layers to put it among
        train_vlm.main(["--version", "2", "--sizes", sizes, "--data", str(v2_data), "--out", str(tmp_path / "x"),
                        "--vision-steps", "0", "--steps", "0", "--insert-layer", "1"])
    loaded = transformers.LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True).eval()
    assert loaded.config.text_config.num_hidden_layers == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=image, pixel_values=pixels).logits, expected, rtol=0, atol=1e-5)


def test_v1_defaults_stay_and_never_caption(tmp_path):
    args = train_vlm.resolve_defaults(train_vlm.build_parser().parse_args(["--data", "d", "--out", "o"]))
    assert (args.version, args.caption_fraction, args.full_from, args.loss_average) == (1, 0.0, 0.8, "tokens")
    assert args.checkpoint_every == 250 and not args.resume


def test_eval_from_picks_the_validation_questions_after_the_offset(v2_data, tmp_path):
    """--eval-from 4 --eval-records 3: the evaluations use validation questions 4, 5 and 6 (a run judged on
    questions no earlier run was chosen on); an offset past the split is an error, not an empty evaluation."""
    parser = train_vlm.build_parser()
    base = ["--data", str(v2_data), "--out", str(tmp_path / "run"), "--vision-steps", "0", "--steps", "0", *TINY_ARGS]
    val = train_vlm.load_records(str(v2_data), "val")
    run = train_vlm.setup(train_vlm.resolve_defaults(parser.parse_args(base + ["--eval-from", "4",
                                                                               "--eval-records", "3"])))
    assert run.val_records == val[4:7] and val[4:7] != val[:3]
    with pytest.raises(ValueError, match="--eval-from 9 is outside the 9 validation questions"):
        train_vlm.setup(train_vlm.resolve_defaults(parser.parse_args(base + ["--eval-from", str(len(val))])))


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(v2_data, tmp_path):
    """Stage 1 stopped after its first step (--max-minutes 0) and resumed; stage 2 run to 6 steps at once,
    and to 3 (--stop-at 3) then resumed to 6: every parameter, the optimizer's step and the running loss
    agree, and the log of the resumed run is appended to."""
    common = ["--data", str(v2_data), "--vision-batch-size", "2", "--batch-size", "3", "--warmup", "2",
              "--eval-records", "3", "--caption-fraction", "0.4", "--extra-questions", "2", *TINY_ARGS]
    stage1_once, stage1_split = tmp_path / "s1_once", tmp_path / "s1_split"
    assert train_vlm.main([*common, "--out", str(stage1_once), "--vision-steps", "3", "--steps", "0"]) == 0
    assert train_vlm.main([*common, "--out", str(stage1_split), "--vision-steps", "3", "--steps", "0",
                           "--max-minutes", "0"]) == 0
    assert not (stage1_split / "model.safetensors").exists()  # stopped in stage 1: nothing saved but resume/
    assert json.loads((stage1_split / "resume" / "trainer_state.json").read_text())["step"] == 1
    assert train_vlm.main([*common, "--out", str(stage1_split), "--vision-steps", "3", "--steps", "0", "--resume"]) == 0
    a = transformers.LlavaForConditionalGeneration.from_pretrained(stage1_once).state_dict()
    b = transformers.LlavaForConditionalGeneration.from_pretrained(stage1_split).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    # stage 2: the curriculum (all tokens from step 6 of 6), captions and the data order all cross the interruption
    stage2 = [*common, "--tower-from", str(stage1_once), "--vision-steps", "0", "--steps", "6", "--eval-every", "6",
              "--ramp-from", "0.2", "--full-from", "0.9", "--checkpoint-every", "2"]
    once, split = tmp_path / "once", tmp_path / "split"
    assert train_vlm.main([*stage2, "--out", str(once)]) == 0
    assert train_vlm.main([*stage2, "--out", str(split), "--stop-at", "3"]) == 0
    assert json.loads((split / "resume" / "trainer_state.json").read_text())["step"] == 3
    assert train_vlm.main([*stage2, "--out", str(split), "--resume"]) == 0
    from safetensors.torch import load_file

    first = load_file(str(once / "resume" / "model.safetensors"))
    second = load_file(str(split / "resume" / "model.safetensors"))
    assert first.keys() == second.keys()
    moved = load_file(str(split / "model.safetensors"))  # the best checkpoint, not the final weights
    for name in first:
        assert torch.allclose(first[name], second[name], atol=1e-6, rtol=0), name
    states = [json.loads((folder / "resume" / "trainer_state.json").read_text()) for folder in (once, split)]
    assert states[0]["step"] == states[1]["step"] == 6
    assert abs(states[0]["running"] - states[1]["running"]) < 1e-6
    events = events_of(split)
    assert [e["event"] for e in events].count("start") == 2
    assert any(e["event"] == "stop" and e["step"] == 3 for e in events)
    assert any(e["event"] == "resume" and e["step"] == 3 for e in events)
    assert events[-1]["event"] == "end" and moved


def _saved_model_and_logits(sizes):
    """A small saved-model stand-in (seed 3, `sizes`), one image-first input and the model's logits on
    it: what a model grown from it (--init-from) must reproduce."""
    processor = vlm.build_processor(version=2)
    source = vlm.build_model(seed=3, tokenizer=processor.tokenizer, version=2, **sizes).eval()
    image = torch.full((1, 578), source.config.image_token_index)
    image[0, :1], image[0, -1] = 5, 6
    pixels = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        expected = source(input_ids=image, pixel_values=pixels).logits
    return processor, source, image, pixels, expected


def test_wider_projector_starts_as_the_saved_model(v2_data, tmp_path):
    """A list vision_feature_layer in --sizes (e.g. [0, -1]): tower_features concatenates the layers as
    LLaVA's own get_image_features does; --init-from a model that read the last layer alone puts the saved
    projector columns at that layer's place and zeros for the added one, so the model computes exactly the
    saved model's logits (in either order of the list); a list that drops the saved layer is refused; the
    feature cache of the wider features has its own file."""
    processor, source, image, pixels, expected = _saved_model_and_logits(TINY)
    for layers in ([0, -1], [-1, 0]):
        wide = vlm.build_model(seed=4, tokenizer=processor.tokenizer, version=2,
                               **{**TINY, "vision_feature_layer": layers}).eval()
        assert wide.model.multi_modal_projector.linear_1.in_features == 2 * TINY["vision_hidden"]
        with torch.no_grad():
            hidden = wide.model.vision_tower(pixels, output_hidden_states=True).hidden_states
            features = train_vlm.tower_features(wide, pixels)
            assert torch.equal(features, torch.cat([hidden[layer][:, 1:] for layer in layers], dim=-1))
            own = wide.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
            own = torch.stack(list(own)) if isinstance(own, (list, tuple)) else own.reshape(features.shape[:2] + (-1,))
            torch.testing.assert_close(wide.model.multi_modal_projector(features), own)
        wide.load_state_dict(train_vlm.with_wider_projector(source.state_dict(), [-1], wide.state_dict(), layers))
        with torch.no_grad():
            torch.testing.assert_close(wide(input_ids=image, pixel_values=pixels).logits, expected, rtol=0, atol=1e-5)
            first = wide.model.multi_modal_projector.linear_1.weight  # the added layer's columns are what is silent
            added = slice(0, TINY["vision_hidden"]) if layers[0] == 0 else slice(TINY["vision_hidden"], None)
            first[:, added].normal_(0, 0.5)
            assert not torch.allclose(wide(input_ids=image, pixel_values=pixels).logits, expected, atol=1e-3)
    only = vlm.build_model(seed=4, tokenizer=processor.tokenizer, version=2, **{**TINY, "vision_feature_layer": [0]})
    with pytest.raises(ValueError, match="drops the saved model's feature layer"):
        train_vlm.with_wider_projector(source.state_dict(), [-1], only.state_dict(), [0])
    # through the command: --init-from a saved model, --steps 0 saves the wider model as loaded
    saved, out = tmp_path / "saved", tmp_path / "wide"
    source.save_pretrained(saved)
    processor.save_pretrained(saved)
    sizes = json.dumps({**TINY, "vision_feature_layer": [0, -1]})
    assert train_vlm.main(["--version", "2", "--sizes", sizes, "--threads", "1", "--data", str(v2_data),
                           "--out", str(out), "--vision-steps", "0", "--steps", "0", "--init-from", str(saved)]) == 0
    loaded = transformers.LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True).eval()
    assert loaded.config.vision_feature_layer == [0, -1]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=image, pixel_values=pixels).logits, expected, rtol=0, atol=1e-5)
    paths = [path for path, _ in train_vlm.group_by_image(train_vlm.load_records(str(v2_data), "train")).items()][:2]
    cache = str(tmp_path / "cache")
    narrow = train_vlm.build_feature_cache(source, processor, str(v2_data), paths, cache, progress=False)
    wider = train_vlm.build_feature_cache(loaded, processor, str(v2_data), paths, cache, progress=False)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2  # same tower, two files
    assert wider.shape[-1] == 2 * narrow.shape[-1] and np.array_equal(wider[..., TINY["vision_hidden"]:], narrow)


def test_feature_cache_gives_stage2_the_towers_features(v2_data, tmp_path):
    """--feature-cache: the cached rows are the frozen tower's features (fp16), stage 2's loss with the
    cache equals the loss that runs the tower (curriculum view and every token), a changed tower gets a new
    cache file, and a trained tower cannot use one."""
    args = ["--data", str(v2_data), "--out", str(tmp_path / "run"), "--vision-steps", "0", "--steps", "4",
            "--batch-size", "2", "--turns", "2", "--caption-fraction", "0.5", *TINY_ARGS]
    parser = train_vlm.build_parser()
    plain = train_vlm.setup(train_vlm.resolve_defaults(parser.parse_args(args)))
    cached = train_vlm.setup(train_vlm.resolve_defaults(parser.parse_args(args + ["--feature-cache",
                                                                                  str(tmp_path / "cache")])))
    paths = [path for path, _ in cached.train_groups]
    cached.cache = train_vlm.build_feature_cache(cached.model, cached.processor, str(v2_data), paths,
                                                 str(tmp_path / "cache"), batch_size=3, progress=False)
    cached.cache_rows = {path: row for row, path in enumerate(paths)}
    images = [Image.open(v2_data / path).convert("RGB") for path in paths[:3]]
    with torch.no_grad():
        features = train_vlm.tower_features(plain.model, plain.processor.image_processor(images, return_tensors="pt")
                                            ["pixel_values"])
    assert torch.allclose(torch.from_numpy(cached.cache[:3].astype("float32")), features, atol=2e-3, rtol=2e-3)
    for step, fraction in ((1, 0.3), (2, 1.0)):  # the same draws (order, turns) for both runs
        state = random.getstate()
        with torch.no_grad():
            expected = train_vlm.stage2_loss(plain, step, fraction)
            random.setstate(state)
            got = train_vlm.stage2_loss(cached, step, fraction)
        assert abs(float(expected) - float(got)) < 1e-4, (step, fraction, float(expected), float(got))
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    with torch.no_grad():
        cached.model.model.vision_tower.encoder.layers[-1].mlp.fc2.bias.add_(0.5)
    again = train_vlm.build_feature_cache(cached.model, cached.processor, str(v2_data), paths, str(tmp_path / "cache"),
                                          progress=False)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2 and not torch.allclose(
        torch.from_numpy(again[:1].astype("float32")), torch.from_numpy(cached.cache[:1].astype("float32")))
    with pytest.raises(SystemExit):
        train_vlm.main(args + ["--feature-cache", str(tmp_path / "cache"), "--tower-lr", "1e-4"])


def test_position_loss_reads_each_token_place_from_the_projector(v2_data, tmp_path):
    """--position-loss: PositionHead's targets are each patch's (column, row) in CLIP's row-major order,
    scaled to [-1, 1]; stage 2's loss gains weight x the head's error on the projected cached features
    (and its gradient reaches the projector); the option needs --feature-cache."""
    config = vlm.build_model(seed=0, tokenizer=vlm.build_processor(version=2).tokenizer, version=2, **TINY).config
    head = train_vlm.PositionHead(config)
    side = config.vision_config.image_size // config.vision_config.patch_size
    target = head.target
    assert target.shape == (side * side, 2)
    assert target[0].tolist() == [-1.0, -1.0] and target[side - 1].tolist() == [1.0, -1.0]  # the first row
    assert target[side].tolist() == [-1.0, pytest.approx(-1 + 2 / (side - 1))]  # the second row's first patch
    # features that hold (column, row) in two channels: read exactly as laid out, wrong when transposed
    with torch.no_grad():
        head.linear.weight.zero_()
        head.linear.bias.zero_()
        head.linear.weight[0, 0] = head.linear.weight[1, 1] = 1.0
    features = torch.zeros(2, side * side, config.text_config.hidden_size)
    features[..., :2] = target
    assert float(head.loss(features).detach()) < 1e-10
    transposed = features.clone()
    transposed[..., :2] = target.flip(1)
    assert float(head.loss(transposed).detach()) > 0.3
    with pytest.raises(ValueError, match="tokens an image"):
        head.loss(features[:, :-1])

    args = ["--data", str(v2_data), "--vision-steps", "0", "--steps", "4", "--batch-size", "2", "--turns", "2",
            "--caption-fraction", "0", "--feature-cache", str(tmp_path / "cache"), *TINY_ARGS]
    parser = train_vlm.build_parser()
    runs = {}
    for weight in (0.0, 2.0):
        run = train_vlm.setup(train_vlm.resolve_defaults(parser.parse_args(
            args + ["--out", str(tmp_path / f"run{weight}"), "--position-loss", str(weight)])))
        paths = [path for path, _ in run.train_groups]
        run.cache = train_vlm.build_feature_cache(run.model, run.processor, str(v2_data), paths,
                                                  str(tmp_path / "cache"), progress=False)
        run.cache_rows = {path: row for row, path in enumerate(paths)}
        if weight:
            run.position_head = train_vlm.PositionHead(run.model.config)
        runs[weight] = run
    state = random.getstate()
    plain = train_vlm.stage2_loss(runs[0.0], 1, 1.0)
    random.setstate(state)
    weighted = train_vlm.stage2_loss(runs[2.0], 1, 1.0)
    run = runs[2.0]
    picked = [run.train_groups[i][0] for i in run.order[:2]]
    cached = torch.from_numpy(run.cache[[run.cache_rows[p] for p in picked]].astype("float32"))
    expected = float(plain) + 2.0 * float(run.position_head.loss(run.model.model.multi_modal_projector(cached)))
    assert abs(float(weighted) - expected) < 1e-4, (float(weighted), expected)
    weighted.backward()
    assert run.position_head.linear.weight.grad.abs().sum() > 0
    assert run.model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    with pytest.raises(SystemExit):
        train_vlm.main(["--data", str(v2_data), "--out", str(tmp_path / "bad"), "--vision-steps", "0",
                        "--position-loss", "1", *TINY_ARGS])


def test_lookup_target_is_the_named_objects_patches():
    """lookup_target: the patches of the one object a location question names (by colour and shape, or by
    shape alone), None for other questions and for a name that fits several objects."""
    rng = np.random.default_rng(0)
    checked = relations = 0
    for _, scene, _ in data_v2.generate("val", 40, seed=3):
        owner = data_v2.patch_labels(scene)
        named = data_v2._unique(scene.objects)
        for index, question in [(scene.objects.index(o), q) for o in named for q in data_v2.location_questions([o])]:
            target = train_vlm.lookup_target(scene, vlm.image_question(question.text, 2))
            if not (owner == index + 1).any():
                assert target is None
                continue
            assert len(target) == 1 and target[0].dtype == bool and (target[0] == (owner == index + 1)).all()
            assert train_vlm.lookup_target(scene, question.text, kinds=("relation",)) is None
            checked += 1
        shapes = [o.shape for o in scene.objects]
        for index, obj in enumerate(scene.objects):
            by_shape = train_vlm.lookup_target(scene, f"Is the {obj.shape} at the top or the bottom?")
            if shapes.count(obj.shape) > 1:
                assert by_shape is None  # the name fits several objects
            elif (owner == index + 1).any():
                assert (by_shape[0] == (owner == index + 1)).all()
        # relation (--lookup-kinds relation): the object whose colour is asked; both objects of a yes/no question
        for anchor, direction, other in data_v2.neighbours(scene.objects, named):
            question = data_v2.neighbour_question(anchor, direction, other).text
            target = train_vlm.lookup_target(scene, question, kinds=("location", "relation"))
            if (owner == scene.objects.index(other) + 1).any():
                assert len(target) == 1 and (target[0] == (owner == scene.objects.index(other) + 1)).all()
                assert train_vlm.lookup_target(scene, question) is None  # location only by default
                relations += 1
        for a in named:
            for b in named:
                if a is not b and data_v2.relation(a, b):
                    question = f"Is the {a.color} {a.shape} {data_v2.relation(a, b)} the {b.color} {b.shape}?"
                    target = train_vlm.lookup_target(scene, question, kinds=("relation",))
                    if target is not None:
                        assert [(t == (owner == scene.objects.index(o) + 1)).all() for t, o in zip(target, (a, b))] \
                            == [True, True] and len(target) == 2
                        relations += 1
        for question in data_v2.make_questions(scene, rng, 6):
            if question.type not in ("location", "relation"):
                assert train_vlm.lookup_target(scene, question.text, kinds=train_vlm.LOOKUP_KINDS) is None, \
                    question.text
    assert checked > 40 and relations > 20


def test_lookup_loss_is_the_layers_attention_on_the_asked_object(v2_data, tmp_path):
    """--lookup-loss: LookupProbe's attention from each location question's answer position equals the
    layer's own attention weights (eager attention, left-padded rows of different lengths, a rotary base
    that matters), summed over the asked object's image tokens; stage 2's loss gains weight x -log(mass)
    and its gradient reaches the layers before."""
    sizes = dict(TINY, text_layers=2, text_heads=2, rope_theta=100.0)
    args = ["--data", str(v2_data), "--vision-steps", "0", "--steps", "4", "--batch-size", "3", "--turns", "8",
            "--extra-questions", "24", "--recall-fraction", "1", "--recall-as", "every", "--caption-fraction", "0",
            "--version", "2", "--sizes", json.dumps(sizes), "--threads", "1"]
    parser = train_vlm.build_parser()
    run = train_vlm.setup(train_vlm.resolve_defaults(parser.parse_args(args + ["--out", str(tmp_path / "a"),
                                                                             "--lookup-loss", "0.5"])))
    run.model.set_attn_implementation("eager")
    with torch.no_grad():  # peaked attention (a fresh model's is near uniform), so that every detail shows
        for layer in run.model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(30.0)
            layer.self_attn.k_proj.weight.mul_(30.0)
    images, conversations, paths = train_vlm.stage2_batch(run, 1)
    inputs = run.collator.batch(images, conversations)
    assert len({int(m.sum()) for m in inputs["attention_mask"]}) > 1  # rows of different lengths: padding
    shown = [torch.arange(vlm.NUM_PATCHES)] * len(paths)
    scenes = [run.train_scenes[p] for p in paths]
    queries, targets = train_vlm.lookup_queries(conversations, inputs, shown, scenes, run.collator.image_token_id,
                                                heads=2)
    assert len(queries) >= 3 and targets.shape == (len(queries), 2, inputs["input_ids"].shape[1])
    assert torch.equal(targets[:, 0], targets[:, 1])  # one object: every head on it
    targets = targets[:, 0]
    # each query position is the last prompt token before a location question's answer
    for (row, position), mask in zip(queries, targets):
        assert inputs["labels"][row, position] == train_vlm.IGNORE_INDEX != inputs["labels"][row, position + 1]
        answer = run.processor.tokenizer.decode([int(inputs["input_ids"][row, position + 1])]).strip()
        assert answer in ("left", "right", "top", "bottom")
        assert mask.sum() > 0 and (inputs["input_ids"][row, mask] == run.collator.image_token_id).all()
    probe = train_vlm.LookupProbe(run.model)
    with torch.no_grad():
        output = probe.run(run.model, {k: v for k, v in inputs.items() if k != "labels"},
                           {"output_attentions": True})
        mass = probe.mass(queries, targets, inputs["attention_mask"])
    weights = output.attentions[train_vlm.LOOKUP_LAYER]
    expected = torch.stack([(weights[row, :, position] * mask).sum(-1)
                            for (row, position), mask in zip(queries, targets)])
    assert mass.shape == (len(queries), 2)
    assert torch.allclose(mass, expected, atol=1e-5), (mass, expected)
    # random halves of each sequence as targets: masses far from uniform, so a wrong computation shows
    halves = torch.rand(targets.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    with torch.no_grad():
        on_halves = probe.mass(queries, halves, inputs["attention_mask"])
    for layer, close in ((train_vlm.LOOKUP_LAYER, True), (0, False)):
        expected = torch.stack([(output.attentions[layer][row, :, position] * mask).sum(-1)
                                for (row, position), mask in zip(queries, halves)])
        assert torch.allclose(on_halves, expected, atol=1e-5) == close, (layer, on_halves, expected)
    assert (on_halves - 0.5).abs().max() > 0.2
    shuffled = torch.randperm(len(queries), generator=torch.Generator().manual_seed(1)).tolist()  # rows out of order
    assert [queries[i][0] for i in shuffled] != sorted(queries[i][0] for i in shuffled)
    with torch.no_grad():
        in_any_order = probe.mass([queries[i] for i in shuffled], halves[shuffled], inputs["attention_mask"])
    torch.testing.assert_close(in_any_order, on_halves[shuffled], rtol=0, atol=1e-6)

    # the loss: the plain loss plus weight x -log(mass), with gradient into the first layer
    plain_run = train_vlm.setup(train_vlm.resolve_defaults(parser.parse_args(args + ["--out", str(tmp_path / "b")])))
    run = train_vlm.setup(train_vlm.resolve_defaults(parser.parse_args(args + ["--out", str(tmp_path / "c"),
                                                                             "--lookup-loss", "0.5"])))
    run.lookup = train_vlm.LookupProbe(run.model)
    with torch.no_grad():  # this model's attention mass (the one above had its projections scaled)
        run.lookup.run(run.model, {k: v for k, v in inputs.items() if k != "labels"}, {})
        mass = run.lookup.mass(queries, targets, inputs["attention_mask"])
    state = random.getstate()
    plain = train_vlm.stage2_loss(plain_run, 1, 1.0)
    random.setstate(state)
    weighted = train_vlm.stage2_loss(run, 1, 1.0)
    assert abs(float(weighted) - (float(plain) + 0.5 * float(-mass.clamp(min=1e-6).log().mean()))) < 1e-4
    weighted.backward()
    first = run.model.model.language_model.layers[0].self_attn.q_proj.weight.grad
    assert first is not None and first.abs().sum() > 0
    with pytest.raises(SystemExit):
        train_vlm.main(["--data", str(v2_data), "--out", str(tmp_path / "bad"), "--vision-steps", "0",
                        "--lookup-loss", "1", "--sizes", json.dumps(TINY), "--threads", "1"])


def test_lookup_queries_split_the_heads_between_two_objects(v2_data):
    """--lookup-kinds relation: a yes/no relation question gives the first half of the heads the first
    object's image tokens and the second half the second's; location questions every head one object."""
    processor = vlm.build_processor(version=2)
    collator = train_vlm.ConversationCollator(processor, str(v2_data))
    scenes = dict(train_vlm.load_scenes(str(v2_data), "train", 2))
    for path, scene in scenes.items():
        named = data_v2._unique(scene.objects)
        pairs = [(a, b) for a in named for b in named if a is not b and data_v2.relation(a, b)]
        located = [q for q in data_v2.location_questions(named)]
        if pairs and located:
            break
    else:
        pytest.skip("no training scene with both question kinds")
    a, b = pairs[0]
    turns = [(vlm.image_question(located[0].text, 2), located[0].answer),
             (f"Is the {a.color} {a.shape} {data_v2.relation(a, b)} the {b.color} {b.shape}?", "yes")]
    inputs = collator.batch([Image.open(v2_data / path).convert("RGB")], [turns])
    shown = [torch.arange(vlm.NUM_PATCHES)]
    queries, targets = train_vlm.lookup_queries([turns], inputs, shown, [scene], collator.image_token_id, heads=4,
                                                kinds=train_vlm.LOOKUP_KINDS)
    assert len(queries) == 2 and queries[0][1] < queries[1][1]
    image = (inputs["input_ids"][0] == collator.image_token_id).nonzero().flatten()
    owner = torch.as_tensor(data_v2.patch_labels(scene))

    def tokens_of(obj):
        mask = torch.zeros(inputs["input_ids"].shape[1], dtype=torch.bool)
        mask[image[owner == scene.objects.index(obj) + 1]] = True
        return mask

    relation = targets[1]
    assert torch.equal(relation[0], tokens_of(a)) and torch.equal(relation[1], tokens_of(a))
    assert torch.equal(relation[2], tokens_of(b)) and torch.equal(relation[3], tokens_of(b))
    only_location = train_vlm.lookup_queries([turns], inputs, shown, [scene], collator.image_token_id, heads=4)[0]
    assert only_location == queries[:1]


def test_more_heads_start_as_the_saved_model(v2_data, tmp_path):
    """--init-from with more text_heads in --sizes (same head size): each saved head keeps its query, key
    and value rows at its `head_places` place, in the half of the heads that --lookup-loss sends to the same
    object of a relation; the added heads' output columns are zero, so the wider model computes the saved
    model's logits exactly, through the command too; an odd or smaller number of heads is refused."""
    sizes = {**TINY, "text_heads": 2, "text_head_dim": 16}
    processor, source, image, pixels, expected = _saved_model_and_logits(sizes)
    assert train_vlm.head_places(2, 4) == [0, 2] and train_vlm.head_places(4, 8) == [0, 1, 4, 5]
    wide = vlm.build_model(seed=4, tokenizer=processor.tokenizer, version=2, **{**sizes, "text_heads": 4}).eval()
    wide.load_state_dict(train_vlm.with_more_heads(source.state_dict(), wide.state_dict(), 2, 4, 16))
    old, new = source.model.language_model.layers[0].self_attn, wide.model.language_model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):  # saved head 1 is the second half's first head
        assert torch.equal(getattr(new, name).weight[32:48], getattr(old, name).weight[16:32])
    assert torch.equal(new.o_proj.weight[:, 32:48], old.o_proj.weight[:, 16:32])
    assert not new.o_proj.weight[:, 16:32].any() and new.q_proj.weight[16:32].any()
    with torch.no_grad():
        torch.testing.assert_close(wide(input_ids=image, pixel_values=pixels).logits, expected, rtol=0, atol=1e-5)
        new.o_proj.weight[:, 16:32].normal_(0, 0.5)  # the added heads' zero output columns keep them silent
        assert not torch.allclose(wide(input_ids=image, pixel_values=pixels).logits, expected, atol=1e-3)
    for bad in (3, 1):
        with pytest.raises(ValueError, match="even number of heads"):
            train_vlm.head_places(2, bad)
    saved, out = tmp_path / "saved", tmp_path / "wide"
    source.save_pretrained(saved)
    processor.save_pretrained(saved)
    assert train_vlm.main(["--version", "2", "--sizes", json.dumps({**sizes, "text_heads": 4}), "--threads", "1",
                           "--data", str(v2_data), "--out", str(out), "--vision-steps", "0", "--steps", "0",
                           "--init-from", str(saved)]) == 0
    loaded = transformers.LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True).eval()
    assert loaded.config.text_config.num_attention_heads == 4
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=image, pixel_values=pixels).logits, expected, rtol=0, atol=1e-5)
