"""Where the selector reads the tokens (DESIGN.md 1, 5; issue 13 item 2): LLaVA-1.5 / NeXT before the
projector (CLS dropped), Qwen after the merger; the same indices prune the projector's output; a selector
trained for another placement or width is refused; configs without a placement read the projector output."""

import json

import pytest
import torch

pytest.importorskip("transformers", reason="needs transformers (in the [test] extra)")

import autoselect  # noqa: E402
from autoselect import AutoSelector  # noqa: E402
from autoselect.integrations import last_selection  # noqa: E402

from tiny_vlms import build  # noqa: E402


def transformer_selector(dim, placement, seed=0):
    torch.manual_seed(seed)
    return AutoSelector(dim, scorer={"layers": 1, "width": 16, "heads": 2}, denoiser="none", placement=placement)


def projector_input(model, pixel_values):
    """The LLaVA projector's input, computed here from the vision tower: layer -2, CLS dropped."""
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    return hidden[model.config.vision_feature_layer][:, 1:]


def test_llava_scores_the_projector_input_and_prunes_the_projected_tokens():
    model, make_inputs = build("llava")
    inputs = make_inputs((1, 2))
    selector = transformer_selector(32, "projector_input")
    with torch.no_grad():
        pre = projector_input(model, inputs["pixel_values"])
        _, expected = selector.select(pre, 5)
        projected = model.model.multi_modal_projector(pre)
    seen = []
    hooks = [model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"]), with_kwargs=True),
             model.model.language_model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["inputs_embeds"]),
                                                                  with_kwargs=True)]
    try:
        with autoselect.pruned(model, selector, keep=5), torch.no_grad():
            model(**inputs)
            index = last_selection(model).index
            model.generate(**inputs, max_new_tokens=2, do_sample=False)  # generate encodes the images itself
            assert [i.tolist() for i in last_selection(model).index] == [i.tolist() for i in index]
    finally:
        for hook in hooks:
            hook.remove()
    assert [i.tolist() for i in index] == expected.tolist()
    # the language model received the projector's output at exactly those indices
    pruned_ids, embeds = seen[0], seen[1]
    assert int((pruned_ids == 60).sum()) == 3 * 5
    torch.testing.assert_close(embeds[pruned_ids == 60], torch.cat([p[i] for p, i in zip(projected, expected)]))
    # the projector output would have chosen differently: the placement matters
    out_selector = transformer_selector(32, "projector_output")
    out_selector.load_state_dict(selector.state_dict())
    _, at_output = out_selector.select(projected, 5)
    assert at_output.tolist() != expected.tolist()


def test_llava_next_scores_the_projector_input_never_keeping_newlines():
    model, make_inputs = build("llava_next")
    inputs = make_inputs((1, 2))
    selector = transformer_selector(32, "projector_input")
    with autoselect.pruned(model, selector, keep=6), torch.no_grad():
        model(**inputs)
        index = last_selection(model).index
    core = model.model
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    sizes = inputs["image_sizes"]
    counts = [image_size_to_num_patches(s.tolist(), core.config.image_grid_pinpoints, 28) for s in sizes]
    ones = [torch.ones(c, 16, 1) for c in counts]
    packed, _ = core.pack_image_features(ones, sizes, "default", image_newline=torch.zeros(1))
    for idx, layout in zip(index, packed):
        assert idx.numel() == 6
        assert bool((layout[idx.long(), 0] == 1).all()), "a newline token was kept"


def test_qwen_scores_the_merger_output():
    model, make_inputs = build("qwen2_vl")
    inputs = make_inputs((1, 2))
    selector = transformer_selector(32, "projector_output")
    with torch.no_grad():
        merged = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                return_dict=True).pooler_output
        _, expected = selector.select(list(merged), 4)
    with autoselect.pruned(model, selector, keep=4), torch.no_grad():
        model(**inputs)
        index = last_selection(model).index
    assert [i.tolist() for i in index] == [e.tolist() for e in expected]


def test_wrong_placement_or_width_is_refused():
    qwen, _ = build("qwen2_vl")
    with pytest.raises(ValueError, match=r"placement 'projector_input'.*offers projector_output \(dim 32\)"):
        autoselect.apply(qwen, transformer_selector(32, "projector_input"))
    llava, _ = build("llava")
    with pytest.raises(ValueError, match=r"placement 'projector_input' with dim 24.*have dim 32"):
        autoselect.apply(llava, transformer_selector(24, "projector_input"))
    with pytest.raises(ValueError, match=r"placement 'projector_output' with dim 24.*have dim 32"):
        autoselect.apply(llava, transformer_selector(24, "projector_output"))
    assert not autoselect.integrations.is_applied(llava) and not autoselect.integrations.is_applied(qwen)


def test_a_config_without_placement_reads_the_projector_output(tmp_path):
    """The first release's configs (no placement, scorer_hidden) load as projector_output and select
    on the projector's output, as before."""
    model, make_inputs = build("llava")
    inputs = make_inputs((2,))
    AutoSelector(32, scorer_hidden=8, denoiser=None).save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["placement"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    selector = AutoSelector.from_pretrained(tmp_path / "old")
    assert selector.config["placement"] == "projector_output"
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
        _, expected = selector.select(list(features), 5)
    with autoselect.pruned(model, tmp_path / "old", keep=5), torch.no_grad():
        model(**inputs)
        assert [i.tolist() for i in last_selection(model).index] == [e.tolist() for e in expected]
