"""LLaVA-NeXT specifics: K per image over the packed anyres sequence (base view + crops + newlines)."""

import torch

import autoselect
from autoselect.integrations import last_selection

import tiny_vlms as T


def test_budget_is_per_image_over_the_packed_sequence():
    model, make_inputs, count_tokens = T.build_llava_next()
    inputs = make_inputs((2, 1), "left")
    sizes = inputs["image_sizes"].tolist()
    n = [count_tokens(s) for s in sizes]
    assert len(set(n)) > 1  # images of different shapes give different packed lengths
    for keep, expected in ((5, [5, 5, 5]), (0.25, [max(1, round(0.25 * x)) for x in n])):
        with autoselect.pruned(model, method="norm", keep=keep):
            with torch.no_grad():
                out = model(**inputs)
            selection = last_selection(model)
        assert selection.num_tokens == n
        assert [len(i) for i in selection.index] == expected
        assert out.logits.shape[1] == int(selection.keep_columns.sum(1).max())


def test_newline_tokens_are_never_dominant_for_visionzip():
    model, make_inputs, count_tokens = T.build_llava_next()
    inputs = make_inputs((1,), "left")
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]
    newline = torch.isclose(features, model.model.image_newline.unsqueeze(0)).all(1)
    assert newline.sum() > 0
    with autoselect.pruned(model, method="visionzip", keep=8, contextual=0):
        with torch.no_grad():
            model(**inputs)
        index = last_selection(model).index[0]
    assert not newline[index].any()
