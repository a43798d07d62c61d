"""autoselect.apply / revert / pruned on tiny models of every family (built from configs, offline).

The core claims: keep = all is bit-identical to the unpatched model (logits and greedy generations,
batch 2 with padding); keep < all is the same computation as the unpatched model with the dropped
image tokens masked out (positions of the unpruned sequence), with a shorter sequence and a KV cache
of text + kept tokens only; revert restores the instance exactly.
"""

import pytest
import torch

import autoselect
from autoselect.integrations import last_selection

import tiny_vlms as T

FAMILIES = T.FAMILIES


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model, make_inputs = T.build(request.param)
    return request.param, model, make_inputs


def _generate(model, inputs, n=4):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("method", ["norm", "random"])
def test_keep_all_is_bit_identical(family, padding, method):
    name, model, make_inputs = family
    inputs = make_inputs((1, 2), padding)
    with torch.no_grad():
        reference = model(**inputs).logits
    ref_gen = _generate(model, make_inputs((1, 2), "left"))
    with autoselect.pruned(model, method=method, keep=1.0):
        with torch.no_grad():
            logits = model(**inputs).logits
        gen = _generate(model, make_inputs((1, 2), "left"))
    assert torch.equal(logits, reference)
    assert torch.equal(gen.sequences, ref_gen.sequences)
    assert all(torch.equal(a, b) for a, b in zip(gen.logits, ref_gen.logits))


@pytest.mark.parametrize("padding", ["left", "right"])
def test_pruned_equals_masked_reference(family, padding):
    """Dropping a token == masking it out: same last-token logits, shorter sequence."""
    name, model, make_inputs = family
    inputs = make_inputs((1, 2), padding)
    with autoselect.pruned(model, method="norm", keep=3):
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
        selection = last_selection(model)
    keep = selection.keep_columns
    assert [len(i) for i in selection.index] == [3, 3, 3]
    for index in selection.index:
        assert torch.all(index[1:] > index[:-1])
    masked = dict(inputs, attention_mask=inputs["attention_mask"] * keep,
                  position_ids=T.unpruned_positions(model, inputs))
    with torch.no_grad():
        reference = model(**masked).logits
    batch, length = inputs["input_ids"].shape
    counts = keep.sum(1)
    assert out.logits.shape[1] == int(counts.max()) < length
    # KV cache: text + kept tokens only (plus alignment slots of the row with fewer images)
    assert out.cache.get_seq_length() == int(counts.max())
    # compare every attended, kept column: pruned column j <-> unpruned column plan[j]
    for b in range(batch):
        cols = keep[b].nonzero().squeeze(1)
        pruned_rows = out.logits[b, -len(cols):]
        valid = inputs["attention_mask"][b, cols].bool()
        torch.testing.assert_close(pruned_rows[valid], reference[b, cols][valid], atol=2e-5, rtol=1e-4)


def test_generate_positions_and_cache(family):
    """generate(): the prefill sees the kept columns of the unpruned positions; every decode step sees
    exactly the positions (M-RoPE rows and rope deltas included) the unpatched model uses; the cache
    holds text + kept tokens + generated tokens."""
    name, model, make_inputs = family
    inputs = make_inputs((2, 1), "left")
    rec = T.RecordLanguageModel(model)
    try:
        ref = _generate(model, inputs, n=3)
        ref_calls, rec.calls = rec.calls, []
        with autoselect.pruned(model, method="divprune", keep=2):
            gen = _generate(model, inputs, n=3)
            keep = last_selection(model).keep_columns
        calls = rec.calls
    finally:
        rec.remove()
    assert gen.sequences.shape == ref.sequences.shape
    assert torch.equal(gen.sequences[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])
    pruned_len = int(keep.sum(1).max())
    assert calls[0]["length"] == pruned_len
    full = ref_calls[0]["position_ids"]
    rows = []
    for b in range(keep.shape[0]):  # kept columns, right-aligned; alignment slots (position 0) on the left
        kept = full[..., b, :][..., keep[b]]
        rows.append(torch.cat([torch.zeros(*kept.shape[:-1], pruned_len - kept.shape[-1], dtype=kept.dtype), kept], -1))
    expected = torch.stack(rows, dim=-2)
    assert torch.equal(calls[0]["position_ids"], expected)
    for step, ref_step in zip(calls[1:], ref_calls[1:]):
        assert step["length"] == 1
        assert torch.equal(step["position_ids"], ref_step["position_ids"])
        assert step["attention_mask"].shape[-1] == ref_step["attention_mask"].shape[-1] - (
            keep.shape[1] - pruned_len)
    cache = getattr(gen, "cache", None) or getattr(gen, "past_key_values", None)
    assert cache is not None and cache.get_seq_length() == pruned_len + 2  # the last token is not fed back


def test_manual_decode_matches_masked_reference():
    """A manual decode loop (no position_ids, no generate) continues the pruned cache correctly."""
    model, make_inputs = T.build("llava")
    inputs = make_inputs((2, 1), "left")
    step = torch.tensor([[7], [9]])
    with autoselect.pruned(model, method="random", keep=5, seed=3):
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            keep = last_selection(model).keep_columns
            mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
            nxt = model(input_ids=step, attention_mask=mask, cache=out.cache, use_cache=True)
    assert nxt.cache.get_seq_length() == int(keep.sum(1).max()) + 1
    masked_mask = inputs["attention_mask"] * keep
    with torch.no_grad():
        ref = model(**dict(inputs, attention_mask=masked_mask), use_cache=True)
        ref_next = model(input_ids=step, attention_mask=torch.cat([masked_mask, torch.ones(2, 1, dtype=torch.long)], 1),
                         cache=ref.cache, use_cache=True)
    assert ref_next.cache.get_seq_length() == inputs["input_ids"].shape[1] + 1
    torch.testing.assert_close(nxt.logits, ref_next.logits, atol=2e-5, rtol=1e-4)


def test_labels_shrink_with_the_sequence():
    model, make_inputs = T.build("llava")
    inputs = make_inputs((1, 1), "right")
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels = labels.masked_fill(inputs["input_ids"] == T.IMAGE, -100)
    with torch.no_grad():
        ref_loss = model(**inputs, labels=labels).loss
    with autoselect.pruned(model, method="norm", keep=4):
        with torch.no_grad():
            out = model(**inputs, labels=labels)
    assert out.logits.shape[1] < labels.shape[1]
    assert torch.isfinite(out.loss)
    assert not torch.equal(out.loss, ref_loss)  # the image context changed; the text labels are the same
    with autoselect.pruned(model, method="norm", keep=1.0):
        with torch.no_grad():
            assert torch.equal(model(**inputs, labels=labels).loss, ref_loss)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_implementations(attn):
    model, make_inputs = T.build("llava", attn=attn)
    inputs = make_inputs((1, 2), "left")
    with torch.no_grad():
        reference = model(**inputs).logits
    with autoselect.pruned(model, method="fastv", keep=1.0):
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, reference)
    with autoselect.pruned(model, method="fastv", keep=4):
        with torch.no_grad():
            out = model(**inputs)
        assert [len(i) for i in last_selection(model).index] == [4, 4, 4]
    assert out.logits.shape[1] == inputs["input_ids"].shape[1] - 12


def test_flash_attention_2():
    pytest.importorskip("flash_attn", reason="flash-attn is not installed here (no CUDA)")
    if not torch.cuda.is_available():
        pytest.skip("flash_attention_2 needs a CUDA device")
    model, make_inputs = T.build("llava", attn="flash_attention_2")
    model = model.to("cuda", torch.bfloat16)
    inputs = {k: v.to("cuda") for k, v in make_inputs((1, 1), "left").items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        reference = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with autoselect.pruned(model, method="norm", keep=1.0):
        with torch.no_grad():
            assert torch.equal(model.generate(**inputs, max_new_tokens=3, do_sample=False), reference)


def test_revert_restores_the_instance_exactly(family):
    name, model, make_inputs = family
    before = dict(model.__dict__)
    core_before = dict(model.model.__dict__)
    forward = model.forward
    inputs = make_inputs((1, 1), "left")
    with torch.no_grad():
        reference = model(**inputs).logits
    autoselect.apply(model, method="visionzip", keep=2)
    assert model.forward is not forward and "forward" in model.__dict__
    with pytest.raises(RuntimeError, match="already patched"):
        autoselect.apply(model, method="norm", keep=2)
    with torch.no_grad():
        assert model(**inputs).logits.shape[1] < reference.shape[1]
    assert autoselect.revert(model) is model
    assert model.__dict__.keys() == before.keys() and all(model.__dict__[k] is before[k] for k in before)
    assert model.model.__dict__.keys() == core_before.keys()
    assert type(model).forward is not None and model.forward.__func__ is type(model).forward
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference)
    with pytest.raises(RuntimeError, match="not patched"):
        autoselect.revert(model)


def test_patch_is_per_instance():
    model_a, make_inputs = T.build("llava")
    model_b, _ = T.build("llava")
    inputs = make_inputs((1, 1), "left")
    autoselect.apply(model_a, method="norm", keep=2)
    try:
        with torch.no_grad():
            assert model_b(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]
            assert model_a(**inputs).logits.shape[1] == inputs["input_ids"].shape[1] - 14
    finally:
        autoselect.revert(model_a)


def test_context_manager_reverts_on_error():
    model, make_inputs = T.build("llava")
    with pytest.raises(ZeroDivisionError):
        with autoselect.pruned(model, method="norm", keep=2):
            1 / 0
    assert "forward" not in model.__dict__


def test_errors():
    model, make_inputs = T.build("llava")
    inputs = make_inputs((1, 1), "left")
    for keep in (0, -3):
        with pytest.raises(ValueError, match="keep"):
            autoselect.apply(model, method="norm", keep=keep)
    for keep in (1.5, 0.0):
        with pytest.raises(ValueError, match="fractional keep"):
            autoselect.apply(model, method="norm", keep=keep)
    with pytest.raises(TypeError, match="keep"):
        autoselect.apply(model, method="norm", keep="64")
    with pytest.raises(ValueError, match="unknown method"):
        autoselect.apply(model, method="sparsevlm")
    with pytest.raises(ValueError, match="needs a selector"):
        autoselect.apply(model)
    with pytest.raises(TypeError, match="bad options"):
        autoselect.apply(model, method="random", temperature=2)
    assert "forward" not in model.__dict__  # failed applies leave nothing behind
    with torch.no_grad():
        reference = model(**inputs).logits
    with autoselect.pruned(model, method="norm", keep=17):  # 16 tokens per image: a larger budget keeps them all
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, reference)
    from transformers import LlamaConfig, LlamaForCausalLM

    text_model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8,
                                              num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match=r"not supported; supported: \['llava', 'llava_next', 'qwen2_5_vl'"):
        autoselect.apply(text_model, method="norm")


def test_text_only_calls_pass_through():
    model, make_inputs = T.build("qwen2_vl")
    inputs = make_inputs((0, 0), "left")
    with torch.no_grad():
        reference = model(**inputs).logits
    with autoselect.pruned(model, method="norm", keep=2):
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, reference)
