"""What `generate()` offers, with a pruned model (DESIGN.md 5, issue 12): several caches in flight,
later turns that continue a pruned cache, training mode, chunked prefill and static caches, budgets
larger than an image, beams / num_return_sequences and use_cache=False.

References are the unpatched model on the same sequence with the dropped tokens masked out and the
positions of the unpruned sequence (`masked_*` helpers), which is what pruning must compute.
"""

import numpy as np
import pytest
import torch

import autoselect
from autoselect.integrations import last_selection

import tiny_vlms as T

METHODS = ["random", "norm", "fastv", "visionzip", "divprune"]


@pytest.fixture(scope="module")
def models():
    return {}


def get(models, family):
    if family not in models:
        models[family] = T.build(family)
    return models[family]


def _cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _positions(model, inputs):
    """Unpruned prefill positions: (B, L) for LLaVA, (3, B, L) M-RoPE + rope deltas (B, 1) for Qwen."""
    if "image_grid_thw" in inputs:
        return model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"],
                                          attention_mask=inputs["attention_mask"])
    mask = inputs["attention_mask"]
    return (mask.cumsum(-1) - 1).clamp(min=0), None


def _pick(logits):
    """Greedy, never an image placeholder (as generate(suppress_tokens=[IMAGE]))."""
    return logits.masked_fill(torch.arange(logits.shape[-1]) == T.IMAGE, float("-inf")).argmax(-1, keepdim=True)


def masked_greedy(model, inputs, keep, steps):
    """Unpatched greedy decoding of `inputs` with the columns keep == False masked out, positions of the
    unpruned sequence. Returns (new tokens (B, steps), list of per-step logits (B, V))."""
    positions, deltas = _positions(model, inputs)
    mask = inputs["attention_mask"] * keep.long()
    with torch.no_grad():
        out = model(**dict(inputs, attention_mask=mask), position_ids=positions, use_cache=True)
    logits = [out.logits[:, -1]]
    tokens = [_pick(logits[-1])]
    cache = _cache(out)
    last = positions[..., -1:]
    for _ in range(steps - 1):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        last = last + 1
        with torch.no_grad():
            out = model(input_ids=tokens[-1], attention_mask=mask, position_ids=last, cache=cache, use_cache=True)
        cache = _cache(out)
        logits.append(out.logits[:, -1])
        tokens.append(_pick(logits[-1]))
    return torch.cat(tokens, 1), logits


def _generate(model, inputs, n=3, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, **kw)


# ----------------------------------------------------------------------------------------------------
# item 2: several caches in flight
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_several_caches_in_flight(models, family):
    """prefill A, prefill B, decode A == prefill A, decode A (manual loop, no position ids)."""
    model, make_inputs = get(models, family)
    a = make_inputs((2, 1), "left", seed=1)
    b = make_inputs((1,), "left", seed=2)
    step = torch.tensor([[7], [9]])
    mask_a = torch.cat([a["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
    with autoselect.pruned(model, method="random", keep=3, seed=1):
        with torch.no_grad():
            out_a = model(**a, use_cache=True)
            alone = model(input_ids=step, attention_mask=mask_a, cache=out_a.cache, use_cache=True).logits
            out_a = model(**a, use_cache=True)
            out_b = model(**b, use_cache=True)
            interleaved = model(input_ids=step, attention_mask=mask_a, cache=out_a.cache, use_cache=True).logits
            # and B still decodes as B
            b_next = model(input_ids=step[:1], attention_mask=torch.cat([b["attention_mask"],
                                                                         torch.ones(1, 1, dtype=torch.long)], 1),
                           cache=out_b.cache, use_cache=True).logits
            b_ref_out = model(**b, use_cache=True)
            b_ref = model(input_ids=step[:1], attention_mask=torch.cat([b["attention_mask"],
                                                                        torch.ones(1, 1, dtype=torch.long)], 1),
                          cache=b_ref_out.cache, use_cache=True).logits
    torch.testing.assert_close(interleaved, alone, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b_next, b_ref, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# item 1: a later turn that continues a pruned cache
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_second_turn_generate_continues_the_pruned_cache(models, family):
    """Turn 2 = generate(whole conversation, past_key_values=turn 1's pruned cache); another prefill in
    between (several caches in flight) changes nothing."""
    model, make_inputs = get(models, family)
    inputs = make_inputs((1, 2), "left")
    with autoselect.pruned(model, method="norm", keep=3):
        first = _generate(model, inputs, n=3, suppress_tokens=[T.IMAGE])
        keep = last_selection(model).keep_columns
        with torch.no_grad():
            model(**make_inputs((1,), "left", seed=7), use_cache=True)  # another conversation
        new = torch.tensor([[11, 12, 13], [21, 22, 23]])
        ids2 = torch.cat([first.sequences, new], 1)
        mask2 = torch.ones_like(ids2)
        mask2[:, :inputs["attention_mask"].shape[1]] = inputs["attention_mask"]
        turn2 = {"input_ids": ids2, "attention_mask": mask2}
        if "mm_token_type_ids" in inputs:
            turn2["mm_token_type_ids"] = (ids2 == T.IMAGE).long()
        second = _generate(model, turn2, n=3, past_key_values=_cache(first), suppress_tokens=[T.IMAGE])
    assert torch.equal(second.sequences[:, :ids2.shape[1]], ids2)
    keep2 = torch.ones_like(ids2, dtype=torch.bool)
    keep2[:, :keep.shape[1]] = keep
    tokens, logits = masked_greedy(model, dict(inputs, **turn2), keep2, 3)
    assert torch.equal(second.sequences[:, ids2.shape[1]:], tokens)
    for got, want in zip(second.logits, logits):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)


def test_second_turn_manual_forward_continues_the_pruned_cache(models):
    """A manual forward of several new tokens after generate(): the mask (unpruned coordinates) is mapped
    onto the pruned cache and, without position_ids, positions continue from the unpruned length (as
    the unpatched model counts them: arange after the cache)."""
    model, make_inputs = get(models, "llava")
    inputs = make_inputs((2, 1), "left")
    with autoselect.pruned(model, method="norm", keep=3):
        first = _generate(model, inputs, n=2, suppress_tokens=[T.IMAGE])
        keep = last_selection(model).keep_columns
        new = torch.tensor([[11, 12, 13], [21, 22, 23]])
        ids2 = torch.cat([first.sequences, new], 1)
        mask2 = torch.ones_like(ids2)
        mask2[:, :inputs["attention_mask"].shape[1]] = inputs["attention_mask"]
        fed = ids2[:, first.sequences.shape[1] - 1:]  # the last generated token (not cached yet) + the new turn
        with torch.no_grad():
            out = model(input_ids=fed, attention_mask=mask2, past_key_values=_cache(first), use_cache=True)
    keep2 = torch.ones_like(ids2, dtype=torch.bool)
    keep2[:, :keep.shape[1]] = keep
    cached = ids2.shape[1] - fed.shape[1]
    positions, _ = _positions(model, {"input_ids": ids2[:, :cached], "attention_mask": mask2[:, :cached]})
    positions = torch.cat([positions, torch.arange(cached, ids2.shape[1]).expand(2, -1)], 1)
    with torch.no_grad():
        ref = model(**dict(inputs, input_ids=ids2, attention_mask=mask2 * keep2.long()), position_ids=positions).logits
    torch.testing.assert_close(out.logits, ref[:, -fed.shape[1]:], atol=5e-5, rtol=1e-4)


def test_images_in_a_call_that_continues_a_pruned_cache_are_refused(models):
    model, make_inputs = get(models, "llava")
    inputs = make_inputs((1, 1), "left")
    with autoselect.pruned(model, method="norm", keep=3):
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            with pytest.raises(ValueError, match="continues a cache"):
                model(**make_inputs((1, 1), "left", seed=4), cache=out.cache, use_cache=True)


# ----------------------------------------------------------------------------------------------------
# item 3: training mode
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_kept_tokens_carry_gradients(family):
    model, make_inputs = T.build(family)
    model.train()
    inputs = make_inputs((1, 2), "right")
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels = labels.masked_fill(inputs["input_ids"] == T.IMAGE, -100)
    # the token after an image is predicted from the image's last column, which pruning may drop
    labels[:, 1:] = labels[:, 1:].masked_fill(inputs["input_ids"][:, :-1] == T.IMAGE, -100)
    projector = model.model.multi_modal_projector.linear_1.weight if family == "llava" else \
        model.model.visual.merger.mlp[0].weight

    with autoselect.pruned(model, method="norm", keep=3):
        loss = model(**inputs, labels=labels).loss
        keep = last_selection(model).keep_columns
    loss.backward()
    grad = projector.grad
    assert grad is not None and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    positions, _ = _positions(model, inputs)
    ref = model(**dict(inputs, attention_mask=inputs["attention_mask"] * keep.long()), position_ids=positions,
                labels=labels).loss
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, projector.grad, atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------
# item 5: chunked prefill and static caches
# ----------------------------------------------------------------------------------------------------

def test_chunked_prefill_is_refused(models):
    model, make_inputs = get(models, "llava")
    inputs = make_inputs((1, 1), "left")
    with autoselect.pruned(model, method="norm", keep=3):
        with pytest.raises(ValueError, match="chunked prefill"):
            _generate(model, inputs, prefill_chunk_size=8)
        from transformers import GenerationConfig

        with pytest.raises(ValueError, match="chunked prefill"):
            _generate(model, inputs, generation_config=GenerationConfig(prefill_chunk_size=8, max_new_tokens=3))


@pytest.mark.parametrize("family", T.FAMILIES)
def test_static_caches_are_refused(models, family):
    from transformers import StaticCache

    model, make_inputs = get(models, family)
    inputs = make_inputs((1, 1), "left")
    with autoselect.pruned(model, method="norm", keep=3):
        with pytest.raises(ValueError, match="static"):
            _generate(model, inputs, cache_implementation="static")
        cache = StaticCache(config=model.config.get_text_config(), max_cache_len=256)
        with pytest.raises(ValueError, match="static"):
            with torch.no_grad():
                model(**inputs, cache=cache, use_cache=True)


# ----------------------------------------------------------------------------------------------------
# item 6: budgets
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next"])
@pytest.mark.parametrize("method", METHODS)
def test_budget_larger_than_an_image_keeps_it_whole(models, family, method):
    model, make_inputs = get(models, family)
    inputs = make_inputs((2, 1), "left")
    with autoselect.pruned(model, method="norm", keep=1.0):
        with torch.no_grad():
            model(**inputs)
        n = last_selection(model).num_tokens
    keep = min(n) + 1  # larger than the smallest image, not than the largest
    assert keep <= max(n)
    with autoselect.pruned(model, method=method, keep=keep):
        with torch.no_grad():
            model(**inputs)
        selection = last_selection(model)
    assert [len(i) for i in selection.index] == [min(keep, x) for x in n]
    for index, x in zip(selection.index, n):
        if x <= keep:
            assert torch.equal(index, torch.arange(x))


def test_keep_accepts_integral_types(models):
    model, make_inputs = get(models, "llava")
    inputs = make_inputs((1, 1), "left")
    for keep in (np.int64(3), torch.tensor(3), np.int32(3)):
        with autoselect.pruned(model, method="norm", keep=keep):
            with torch.no_grad():
                model(**inputs)
            assert [len(i) for i in last_selection(model).index] == [3, 3]
    with autoselect.pruned(model, method="norm", keep=np.float32(0.25)):
        with torch.no_grad():
            model(**inputs)
        assert [len(i) for i in last_selection(model).index] == [4, 4]
    for bad in (True, torch.tensor([3, 4]), "3"):
        with pytest.raises(TypeError, match="keep"):
            autoselect.apply(model, method="norm", keep=bad)
    assert "forward" not in model.__dict__


def test_fastv_layer_is_validated_at_apply(models):
    model, _ = get(models, "llava")  # 3 language-model layers
    for layer in (4, 10):
        with pytest.raises(ValueError, match=r"layer.*\[1, 3\].*got " + str(layer)):
            with autoselect.pruned(model, method="fastv", layer=layer):  # reverted if it ever applied
                pass
    with pytest.raises(ValueError, match="layer"):
        with autoselect.pruned(model, method="fastv", layer=0):
            pass
    assert "forward" not in model.__dict__
    with autoselect.pruned(model, method="fastv", layer=3, keep=2):
        pass


# ----------------------------------------------------------------------------------------------------
# item 4: beams, num_return_sequences, use_cache=False
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method", METHODS)
def test_same_answer_with_and_without_cache(models, family, method):
    model, make_inputs = get(models, family)
    inputs = make_inputs((1, 2), "left")
    with autoselect.pruned(model, method=method, keep=3):
        cached = _generate(model, inputs, n=4, use_cache=True)
        keep_cached = last_selection(model).keep_columns
        uncached = _generate(model, inputs, n=4, use_cache=False)
        keep_uncached = last_selection(model).keep_columns
    assert torch.equal(cached.sequences, uncached.sequences)
    assert torch.equal(keep_uncached[:, :keep_cached.shape[1]], keep_cached)
    for a, b in zip(cached.logits, uncached.logits):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("method", ["visionzip", "fastv"])
def test_beams_and_return_sequences(models, family, method):
    model, make_inputs = get(models, family)
    inputs = make_inputs((1, 2), "left")
    with autoselect.pruned(model, method=method, keep=3):
        with torch.no_grad():
            model(**inputs)
        single = last_selection(model)
        beams = _generate(model, inputs, n=3, num_beams=2, num_return_sequences=2)
        expanded = last_selection(model)
    # every beam copy of an image keeps what the image keeps alone
    per_row = [len(single.index) // 2, len(single.index) - len(single.index) // 2]
    assert per_row == [1, 2]
    expected = []
    start = 0
    for count in per_row:
        expected += single.index[start:start + count] * 2
        start += count
    assert len(expanded.index) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(expanded.index, expected))
    assert torch.equal(expanded.keep_columns, single.keep_columns.repeat_interleave(2, 0))
    positions, _ = _positions(model, inputs)
    with torch.no_grad():
        ref = model.generate(**dict(inputs, attention_mask=inputs["attention_mask"] * single.keep_columns.long()),
                             position_ids=positions, max_new_tokens=3, do_sample=False, num_beams=2,
                             num_return_sequences=2)
    assert torch.equal(beams.sequences, ref)
    with autoselect.pruned(model, method=method, keep=3):
        torch.manual_seed(0)
        with torch.no_grad():
            sampled = model.generate(**inputs, max_new_tokens=2, do_sample=True, num_return_sequences=2)
        assert torch.equal(last_selection(model).keep_columns, single.keep_columns.repeat_interleave(2, 0))
    assert sampled.shape[0] == 4


@pytest.mark.parametrize("method", ["visionzip", "fastv", "divprune"])
def test_kept_tokens_carry_gradients_for_every_method(models, method):
    model, make_inputs = get(models, "llava")
    inputs = make_inputs((1, 1), "right")
    projector = model.model.multi_modal_projector.linear_1.weight
    projector.grad = None
    with autoselect.pruned(model, method=method, keep=3):
        with torch.no_grad():
            reference = model(**inputs).logits
        logits = model(**inputs).logits  # gradients on
    assert torch.equal(logits.detach(), reference)  # the same computation
    logits.float().pow(2).mean().backward()
    assert projector.grad is not None and projector.grad.abs().sum() > 0
    projector.grad = None
