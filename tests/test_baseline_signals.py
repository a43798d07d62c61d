"""The scoring signal of each training-free baseline, checked against the model's OWN computation.

For every method the test computes, independently of `autoselect.baselines`, which tokens the
method's paper rule selects, from what the unpatched model itself produces (eager attention with
`output_attentions`, or the recorded weights of its eager attention function, and its own image
features), then checks that the pruned model

1. keeps exactly those tokens (`autoselect.integrations.last_selection`, where it exists), and
2. computes exactly what the UNPATCHED model computes when those tokens are the only visual tokens
   present: the other placeholders masked out, every token at its unpruned position (the reference
   of tests/test_integrations.py), with VisionZip's merged contextual tokens in place of their targets.

Signals (DESIGN.md 4; the rules the baseline modules document):
- FastV (layer=K): attention that the LAST ATTENDED token of each row pays each image token in
  decoder layer K-1 (after RoPE / M-RoPE), averaged over heads; top-K per image.
- VisionZip, LLaVA: the CLS row of the attention of the vision layer whose output is the selected
  feature (`vision_feature_layer`), summed over heads, over the patch tokens: the dominant tokens;
  contextual tokens by the paper's rule (evenly spaced targets among the rest, every other remaining
  token merged into its most similar target by the layer's keys (mean over heads), cosine;
  contextual = target + mean of its group), on the projector's output (the package's documented
  place), each at its target's position. LLaVA-NeXT: the CLS signal of every crop, laid out by the
  model's own `pack_image_features` (newline tokens never dominant).
  Qwen2-VL / Qwen2.5-VL (no CLS): attention RECEIVED in the last vision block (mean over heads and
  queries of its attention segment, summed over the 2x2 patches of a merged token), in the
  original patch order (Qwen2.5-VL's window order undone), keys = post-rotary keys averaged over
  heads and the 2x2 patches.
- DivPrune: greedy max-min diversity on cosine distance (the DivPrune reference code): the first
  token maximises its nearest-neighbour distance, then each step adds the token whose minimum
  distance to the chosen set is largest.

Also: decoding continues the pruned cache (one token per step on a cache of everything before it),
which transformers releases before the `cache=` argument (5.23 and older) silently break.

Everything runs on the tiny models of tests/tiny_vlms.py with eager attention (offline, CPU).
"""

import sys

import pytest
import torch
import torch.nn.functional as F

import autoselect

import tiny_vlms as T

try:  # kept indices, where the package exposes them; the output comparison does not need them
    from autoselect.integrations import last_selection
except ImportError:  # pragma: no cover - only after a refactor that drops it
    last_selection = None


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = T.build(family, attn="eager")
        return cache[family]

    return get


# ----------------------------------------------------------------------------------------------------
# What the unpatched model computes
# ----------------------------------------------------------------------------------------------------

def _image_inputs(inputs):
    return {k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw", "image_sizes")}


def _features(model, inputs):
    """The image features as the language model receives them: list of (N_i, D), one per image."""
    with torch.no_grad():
        out = model.model.get_image_features(**_image_inputs(inputs), return_dict=True)
    return [f for f in out.pooler_output]


def _image_columns(inputs, sizes):
    """Flat (b * L + s) placeholder columns of each image, in placeholder order over (batch, sequence)."""
    flat = (inputs["input_ids"] == T.IMAGE).reshape(-1).nonzero().squeeze(1)
    assert flat.numel() == sum(sizes)
    return list(torch.split(flat, sizes))


def _keep_columns(inputs, cols, index):
    ids = inputs["input_ids"]
    keep = (ids != T.IMAGE).reshape(-1).clone()
    for c, i in zip(cols, index):
        keep[c[i]] = True
    return keep.view_as(ids)


def _reference_logits(model, inputs, keep, features=None):
    """The unpatched model with the dropped image tokens absent (masked out), every token at its
    unpruned position. `features` (list of (N_i, D)), when given, replace the image features (for
    VisionZip's merged tokens): the model then runs on the embeddings."""
    masked = dict(inputs, attention_mask=inputs["attention_mask"] * keep,
                  position_ids=T.unpruned_positions(model, inputs))
    if features is not None:
        ids = inputs["input_ids"]
        embeds = model.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == T.IMAGE).unsqueeze(-1), torch.cat(features).to(embeds.dtype))
        masked = {"inputs_embeds": embeds, "attention_mask": masked["attention_mask"],
                  "position_ids": masked["position_ids"]}
    with torch.no_grad():
        return model(**masked).logits


def _topk_sorted(scores, k):
    return torch.sort(torch.topk(scores, k).indices).values


# ----------------------------------------------------------------------------------------------------
# The check: the pruned model keeps `index` and computes what the reference computes
# ----------------------------------------------------------------------------------------------------

def _check_pruned(model, inputs, method, keep, expected_index, features=None, **options):
    sizes = [int(f.shape[0]) for f in _features(model, inputs)]
    cols = _image_columns(inputs, sizes)
    keep_cols = _keep_columns(inputs, cols, expected_index)
    reference = _reference_logits(model, inputs, keep_cols, features)
    with autoselect.pruned(model, method=method, keep=keep, **options):
        with torch.no_grad():
            logits = model(**inputs).logits
        selection = last_selection(model) if last_selection is not None else None
    if selection is not None:
        got = [i.cpu().tolist() for i in selection.index]
        want = [i.tolist() for i in expected_index]
        assert got == want, f"{method}: kept {got}, the paper's rule on the model's own signal keeps {want}"
    assert logits.shape[1] == int(keep_cols.sum(1).max())
    for b in range(keep_cols.shape[0]):
        kept = keep_cols[b].nonzero().squeeze(1)
        valid = inputs["attention_mask"][b, kept].bool()
        torch.testing.assert_close(logits[b, -len(kept):][valid], reference[b, kept][valid], atol=2e-5, rtol=1e-4,
                                   msg=lambda m: f"{method}: row {b} differs from the unpatched model run on the "
                                                 f"expected tokens only: {m}")


# ----------------------------------------------------------------------------------------------------
# FastV
# ----------------------------------------------------------------------------------------------------

def fastv_expected(model, inputs, sizes, k, layer):
    """Top-k image tokens of each image by the attention of its row's last attended token in decoder
    layer `layer` - 1 (FastV's K = layer), averaged over heads, from the model's own eager attention."""
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    att = attentions[layer - 1].to(torch.float32)  # (B, H, L, L)
    mask = inputs["attention_mask"]
    batch, length = mask.shape
    last = (mask * torch.arange(length)).argmax(1)  # last attended column of each row
    rows = att[torch.arange(batch), :, last].mean(1)  # (B, L): heads averaged
    flat = rows.reshape(-1)
    return [_topk_sorted(flat[c], k) for c in _image_columns(inputs, sizes)]


FASTV_KEEP = {"llava": 4, "llava_next": 10, "qwen2_vl": 3, "qwen2_5_vl": 3}


# FastV's default K=2 with both paddings (right padding: the last ATTENDED token is not the last
# column), the first and the last layer once each
@pytest.mark.parametrize("padding,layer", [("left", 2), ("right", 2), ("left", 1), ("right", 3)])
@pytest.mark.parametrize("family", T.FAMILIES)
def test_fastv_ranks_by_last_token_attention(models, family, padding, layer):
    model, make_inputs = models(family)
    inputs = make_inputs((1, 2), padding)
    sizes = [int(f.shape[0]) for f in _features(model, inputs)]
    k = FASTV_KEEP[family]
    expected = fastv_expected(model, inputs, sizes, k, layer)
    _check_pruned(model, inputs, "fastv", k, expected, layer=layer)


def test_fastv_signal_is_not_degenerate(models):
    """The check above has teeth: on these inputs the ranking changes from layer to layer, so a method
    scoring at the wrong layer fails it."""
    model, make_inputs = models("llava")
    inputs = make_inputs((1, 2), "left")
    sizes = [16, 16, 16]
    by_layer = [fastv_expected(model, inputs, sizes, 4, layer) for layer in (1, 2, 3)]
    assert any(not torch.equal(a, b) for a, b in zip(by_layer[0], by_layer[1]))
    assert any(not torch.equal(a, b) for a, b in zip(by_layer[1], by_layer[2]))


# ----------------------------------------------------------------------------------------------------
# VisionZip
# ----------------------------------------------------------------------------------------------------

def clip_signals(model, pixel_values):
    """LLaVA: (CLS attention summed over heads (P, T-1), keys averaged over heads (P, T-1, d)) over
    the patch tokens, of the vision layer whose output is the selected feature; from the tower's own
    eager attention (output_attentions) and its own k_proj."""
    core = model.model
    tower = core.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers
    feature_layer = core.config.vision_feature_layer
    hidden_index = feature_layer % (len(layers) + 1)  # index into hidden_states (0: the embeddings)
    layer = hidden_index - 1  # the encoder layer that produced that hidden state
    captured = {}
    handle = layers[layer].self_attn.k_proj.register_forward_hook(lambda m, a, out: captured.setdefault("k", out))
    try:
        with torch.no_grad():
            out = tower(pixel_values, output_attentions=True)
    finally:
        handle.remove()
    att = out.attentions[layer].to(torch.float32)  # (P, H, T, T)
    heads = att.shape[1]
    cls = att[:, :, 0, 1:].sum(1)
    p, t, _ = captured["k"].shape
    keys = captured["k"].view(p, t, heads, -1).to(torch.float32).mean(2)[:, 1:]
    return list(cls), list(keys)


def qwen_signals(model, inputs, monkeypatch):
    """Qwen2-VL / Qwen2.5-VL: per merged token (original order), the attention it receives in the
    last vision block (mean over heads and queries of its segment, summed over its merge^2 patches)
    and its post-rotary keys (mean over heads and patches). Recorded from the model's own eager
    attention function; the window order of Qwen2.5-VL is undone by matching the first block's input
    rows to the patch embeddings."""
    visual = model.model.visual
    target = visual.blocks[-1].attn
    module = sys.modules[type(target).__module__]
    original = module.eager_attention_forward
    records = []

    def recording(mod, query, key, value, attention_mask, *args, **kwargs):
        out, weights = original(mod, query, key, value, attention_mask, *args, **kwargs)
        if mod is target:
            records.append((weights.detach().to(torch.float32), key.detach().to(torch.float32)))
        return out, weights

    monkeypatch.setattr(module, "eager_attention_forward", recording)
    seen = {}
    h1 = visual.patch_embed.register_forward_hook(lambda m, a, out: seen.setdefault("embed", out.detach()))
    h2 = visual.blocks[0].register_forward_pre_hook(lambda m, a: seen.setdefault("block0", a[0].detach()))
    try:
        _features(model, inputs)
    finally:
        h1.remove(), h2.remove()
        monkeypatch.setattr(module, "eager_attention_forward", original)
    assert records, "the last vision block did not run the eager attention function"
    received = torch.cat([w.mean(dim=(0, 1, 2)) for w, _ in records])  # (S,) block order
    keys = torch.cat([k[0] for _, k in records], dim=1).mean(0)  # (S, d) block order
    embed, block0 = seen["embed"], seen["block0"]
    match = (block0.unsqueeze(1) == embed.unsqueeze(0)).all(-1)  # (S, S): block row j is patch i
    assert torch.equal(match.sum(1), torch.ones(len(embed), dtype=torch.long))
    origin = match.long().argmax(1)  # original patch of each block row
    received_o = torch.empty_like(received)
    received_o[origin] = received
    keys_o = torch.empty_like(keys)
    keys_o[origin] = keys
    unit = visual.spatial_merge_size ** 2
    scores = received_o.view(-1, unit).sum(1)
    merged_keys = keys_o.view(-1, unit, keys.shape[-1]).mean(1)
    sizes = (inputs["image_grid_thw"].prod(-1) // unit).tolist()
    return list(torch.split(scores, sizes)), list(torch.split(merged_keys, sizes))


def visionzip_expected(features, scores, keys, k, contextual):
    """VisionZip's rule on each image: dominant = top-(k - contextual) by `scores`; of the rest
    (ascending), targets at every `step` = max(1, rest // contextual), the others assigned to their
    most cosine-similar target by `keys`; contextual token = target + mean of its group.
    Returns (index list, features list with the contextual tokens in place of their targets)."""
    index, replaced = [], []
    for x, s, kk in zip(features, scores, keys):
        n = x.shape[0]
        dominant = torch.topk(s, k - contextual).indices
        is_rest = torch.ones(n, dtype=torch.bool)
        is_rest[dominant] = False
        rest = is_rest.nonzero().squeeze(1)
        chosen = dominant
        new = x.clone()
        if contextual:
            step = max(1, len(rest) // contextual)
            picks = torch.arange(0, len(rest), step)[:contextual]
            targets = rest[picks]
            others = rest[~torch.isin(torch.arange(len(rest)), picks)]
            unit = kk / kk.norm(dim=-1, keepdim=True)
            similarity = unit[others] @ unit[targets].T
            group = similarity.argmax(1)
            for t, target in enumerate(targets.tolist()):
                members = others[group == t]
                extra = x[members].to(torch.float32).mean(0) if len(members) else torch.zeros(x.shape[1])
                new[target] = (x[target].to(torch.float32) + extra).to(x.dtype)
            chosen = torch.cat([dominant, targets])
        index.append(torch.sort(chosen).values)
        replaced.append(new)
    return index, replaced


def _visionzip_signals(model, family, inputs, monkeypatch):
    if family == "llava":
        return clip_signals(model, inputs["pixel_values"])
    return qwen_signals(model, inputs, monkeypatch)


VISIONZIP_FAMILIES = ["llava", "qwen2_vl", "qwen2_5_vl"]


@pytest.mark.parametrize("family", VISIONZIP_FAMILIES)
def test_visionzip_dominant_tokens(models, family, monkeypatch):
    """contextual=0: the kept tokens are the top-K by the vision tower's own attention signal."""
    model, make_inputs = models(family)
    inputs = make_inputs((1, 2), "left")
    features = _features(model, inputs)
    scores, keys = _visionzip_signals(model, family, inputs, monkeypatch)
    k = 4 if family == "llava" else 3
    expected, _ = visionzip_expected(features, scores, keys, k, 0)
    _check_pruned(model, inputs, "visionzip", k, expected, contextual=0)


@pytest.mark.parametrize("family", VISIONZIP_FAMILIES)
def test_visionzip_contextual_tokens(models, family, monkeypatch):
    """Dominant + contextual: the merged tokens reach the language model at their targets' positions."""
    model, make_inputs = models(family)
    inputs = make_inputs((1, 2), "right")
    features = _features(model, inputs)
    scores, keys = _visionzip_signals(model, family, inputs, monkeypatch)
    k, contextual = (6, 2) if family == "llava" else (4, 2)
    expected, merged = visionzip_expected(features, scores, keys, k, contextual)
    _check_pruned(model, inputs, "visionzip", k, expected, features=merged, contextual=contextual)


def llava_next_scores(model, inputs):
    """LLaVA-NeXT: the CLS signal of every crop (base view + anyres crops) laid out per image by the
    model's own `pack_image_features` (unpadding, newline tokens), newline tokens scored -inf."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    core = model.model
    counts = [image_size_to_num_patches(image_size=s, grid_pinpoints=core.config.image_grid_pinpoints,
                                        patch_size=core.config.vision_config.image_size) for s in inputs["image_sizes"]]
    crops = torch.cat([p[:n] for p, n in zip(inputs["pixel_values"], counts)])
    cls, _ = clip_signals(model, crops)
    per_image = list(torch.split(torch.stack(cls).unsqueeze(-1), counts))
    with torch.no_grad():
        packed, _ = core.pack_image_features(per_image, inputs["image_sizes"], vision_feature_select_strategy="default",
                                             image_newline=torch.tensor([float("-inf")]))
    return [p[:, 0] for p in packed]


def test_visionzip_dominant_tokens_llava_next(models):
    """LLaVA-NeXT: K per image over the packed sequence, dominant by the CLS signal of its own crop."""
    model, make_inputs = models("llava_next")
    inputs = make_inputs((1, 2), "left")
    features = _features(model, inputs)
    scores = llava_next_scores(model, inputs)
    assert [len(s) for s in scores] == [len(f) for f in features]
    expected = [_topk_sorted(s, 10) for s in scores]
    _check_pruned(model, inputs, "visionzip", 10, expected, contextual=0)


def test_visionzip_signal_is_not_degenerate(models):
    """On these inputs the CLS row ranks the patches differently from the other query rows and from
    the neighbouring layers, so a method scoring with any of those fails the tests above."""
    model, make_inputs = models("llava")
    inputs = make_inputs((1, 2), "left")
    with torch.no_grad():
        att = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions
    ref = [_topk_sorted(s, 4) for s in att[1][:, :, 0, 1:].sum(1)]
    for other in (att[1][:, :, 1, 1:].sum(1), att[1][:, :, -1, 1:].sum(1), att[0][:, :, 0, 1:].sum(1),
                  att[2][:, :, 0, 1:].sum(1)):
        assert any(not torch.equal(a, _topk_sorted(s, 4)) for a, s in zip(ref, other))


def test_reference_with_replaced_features_matches_the_pixel_reference(models):
    """The embeddings path of the reference (used for VisionZip's merged tokens) is the pixel path
    when nothing is replaced."""
    model, make_inputs = models("qwen2_vl")
    inputs = make_inputs((1, 2), "right")
    features = _features(model, inputs)
    sizes = [f.shape[0] for f in features]
    keep = _keep_columns(inputs, _image_columns(inputs, sizes), [torch.tensor([0, 2])] * len(sizes))
    a = _reference_logits(model, inputs, keep)
    b = _reference_logits(model, inputs, keep, features)
    valid = (inputs["attention_mask"] * keep).bool()
    torch.testing.assert_close(a[valid], b[valid], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# DivPrune
# ----------------------------------------------------------------------------------------------------

def divprune_expected(x, k):
    """The DivPrune reference loop: cosine distance matrix; step 0 scores every token by its second
    smallest distance (its nearest neighbour, itself excluded), later steps by the minimum distance to
    the chosen tokens; argmax each step (already chosen tokens excluded)."""
    unit = x.to(torch.float32) / x.to(torch.float32).norm(dim=-1, keepdim=True)
    distance = 1.0 - unit @ unit.T
    chosen = []
    for step in range(k):
        if step == 0:
            scores = torch.topk(distance, 2, dim=0, largest=False).values[1]
        else:
            scores = distance[chosen].min(0).values
            scores[chosen] = float("-inf")
        chosen.append(int(torch.argmax(scores)))
    return torch.sort(torch.tensor(chosen)).values


DIVPRUNE_KEEP = {"llava": 5, "llava_next": 12, "qwen2_vl": 3, "qwen2_5_vl": 3}


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family", T.FAMILIES)
def test_divprune_is_greedy_max_min(models, family, padding):
    model, make_inputs = models(family)
    inputs = make_inputs((1, 2), padding)
    k = DIVPRUNE_KEEP[family]
    expected = [divprune_expected(f, k) for f in _features(model, inputs)]
    _check_pruned(model, inputs, "divprune", k, expected)


def test_divprune_reference_is_not_a_simpler_rule():
    """The greedy max-min picks differ from simpler rules on these features (max-sum diversity, a
    first pick by largest mean distance), so those fail the test above."""
    torch.manual_seed(0)
    x = torch.randn(30, 8)
    x[:10] += 3 * torch.randn(1, 8)  # a cluster
    unit = F.normalize(x, dim=-1)
    distance = 1.0 - unit @ unit.T
    maxmin = divprune_expected(x, 6)
    chosen = [int(distance.mean(0).argmax())]
    for _ in range(5):
        s = distance[chosen].sum(0)
        s[chosen] = float("-inf")
        chosen.append(int(s.argmax()))
    assert not torch.equal(maxmin, torch.sort(torch.tensor(chosen)).values)


# ----------------------------------------------------------------------------------------------------
# Decoding continues the pruned cache (the transformers floor: before 5.19 the cache went unused)
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", T.FAMILIES)
def test_decoding_continues_the_pruned_cache(models, family):
    """generate() on a pruned model: the prefill fills the cache with text + kept tokens, and every
    decode step feeds the language model ONE token on top of a cache holding everything before it
    (a transformers whose forward ignores the cache argument decodes each token without context)."""
    model, make_inputs = models(family)
    inputs = make_inputs((1, 2), "left")
    calls = []

    def hook(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        calls.append((kwargs["inputs_embeds"].shape[1], None if cache is None else cache.get_seq_length()))

    n = 4
    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with autoselect.pruned(model, method="norm", keep=3):
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                     return_dict_in_generate=True)
    finally:
        handle.remove()
    sizes = [int(f.shape[0]) for f in _features(model, inputs)]
    removed = (inputs["input_ids"] == T.IMAGE).sum(1) - 3 * torch.tensor([1, 2])
    pruned_len = inputs["input_ids"].shape[1] - int(removed.min())
    assert sum(sizes) > 9 and len(calls) == n, calls
    assert calls[0][0] == pruned_len and not calls[0][1], f"prefill: {calls[0]}"
    for step, (length, cached) in enumerate(calls[1:], start=1):
        assert (length, cached) == (1, pruned_len + step - 1), (
            f"decode step {step}: the language model got {length} token(s) on a cache of {cached}; expected 1 on "
            f"{pruned_len + step - 1} (prompt after pruning + earlier steps)")
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    assert cache is not None and cache.get_seq_length() == pruned_len + n - 1
