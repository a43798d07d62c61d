"""End-to-end prefill benchmark: a LLaVA-1.5-shaped model, full against keep in {192, 128, 64} of 576.

What is timed: one prefill call of the language model (as `generate` makes it: logits of the last
token only) on a batch of prompts of `text` text tokens + `image` visual tokens, through
`autoselect.apply` (selection cost included: the AutoSelector's Scorer + fused top-K, or the norm
baseline, plus the sequence pruning), against the unpatched model. The vision tower and projector
run the same for every row and are left out: the image features are passed pre-encoded
(`mm_encoder_outputs`), as `generate` itself does. Random weights (speed does not depend on them).

Shapes (`hidden,layers,text,image[,batch]`, batch 1 by default): on a GPU the real LLaVA-1.5-7B
language model (4096 wide, 32 layers, 32 heads, MLP 11008, vocab 32000) in bf16; on the CPU a reduced
width (1024, 8 layers, 16 heads, MLP 2752) in fp32. KV cache size = 2 (K, V) x layers x hidden x cached tokens x bytes.
"""

import torch

from ._timing import device_name, measure, today, versions

SHAPE_FIELDS = ("hidden", "layers", "text", "image", "batch")
DEFAULT_SHAPES = {"cpu": ["1024,8,64,576"], "cuda": ["4096,32,64,576"]}
KEEPS = (192, 128, 64)
IMAGE_TOKEN = 31999


def parse_shape(text: str) -> dict:
    """hidden,layers,text,image[,batch] (batch 1 when left out) as run()'s keyword arguments."""
    values = [int(v) for v in text.split(",")]
    if len(values) not in (len(SHAPE_FIELDS) - 1, len(SHAPE_FIELDS)) or min(values) < 1:
        raise ValueError(f"prefill shapes are {','.join(SHAPE_FIELDS)} (batch optional, all positive), got {text!r}")
    return dict(zip(SHAPE_FIELDS, values))


def build_model(hidden: int, layers: int, dtype, device, batch: int = 1):
    """A LLaVA-1.5-shaped LlavaForConditionalGeneration with random weights (tiny vision tower: it
    is not run; the image features come pre-encoded)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    heads = max(1, hidden // 128) if hidden >= 4096 else max(1, hidden // 64)
    text = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(round(hidden * 11008 / 4096 / 16)) * 16,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=4096)
    vision = CLIPVisionConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=1, num_attention_heads=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, image_seq_length=576)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config)
    return model.to(dtype).eval()


def make_inputs(model, text: int, image: int, batch: int, dtype, device, seed: int = 0):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    gen = torch.Generator().manual_seed(seed)
    half = text // 2
    ids = torch.cat([torch.randint(3, 31000, (batch, half), generator=gen), torch.full((batch, image), IMAGE_TOKEN),
                     torch.randint(3, 31000, (batch, text - half), generator=gen)], 1).to(device)
    hidden = model.config.text_config.hidden_size
    features = [torch.randn(image, hidden, generator=gen).to(device, dtype) for _ in range(batch)]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=features)}}


def kv_bytes(model, tokens: int, batch: int, dtype) -> int:
    cfg = model.config.text_config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * tokens * batch * \
        torch.finfo(dtype).bits // 8


def run(hidden: int = 1024, layers: int = 8, text: int = 64, image: int = 576, dtype=torch.float32, device="cpu",
        repeats: int = 5, batch: int = 1, keeps=KEEPS, methods=("autoselect", "norm"), selector=None):
    """Measure full and pruned prefill; returns rows in the `_timing.FIELDS` format (kernel "prefill",
    mode "full" / "keep=K", provider the method or "ceiling"; the note holds the speed-up over full and
    the KV cache). Each timed call passes a new encoder-output object, so `apply`'s memo (the same
    encoded images with the same prompt reuse their selection) never skips the selection being timed.
    The "ceiling" row of each K is the unpatched model on text + K image tokens: the time any pruning to
    K tokens could reach, so (pruned - ceiling) is what selection and pruning cost. `selector`: the
    AutoSelector to time (default: an untrained one; speed does not depend on its weights)."""
    import autoselect
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    device = torch.device(device)
    model = build_model(hidden, layers, dtype, device)
    inputs = make_inputs(model, text, image, batch, dtype, device)
    if selector is None:
        selector = autoselect.AutoSelector(hidden, denoiser=None).to(device)
    repeats = max(1, min(repeats, 5)) if device.type == "cpu" else repeats
    shape = f"{batch}x({text}+{image}) h{hidden} L{layers}"
    meta = {"date": today(), "kernel": "prefill", "backend": "", "shape": shape, "dtype": str(dtype).replace("torch.", ""),
            "device": device.type, "device_name": device_name(device), "gbps": "", **versions()}

    def timed(inputs):
        features = inputs["mm_encoder_outputs"]["image"].pooler_output

        def call():
            encoded = BaseModelOutputWithPooling(pooler_output=list(features))
            fresh = {**inputs, "mm_encoder_outputs": {"image": encoded}}
            with torch.no_grad():
                out = model(**fresh, logits_to_keep=1, use_cache=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out

        cache_len = call().cache.get_seq_length()
        ms, p20, p80 = measure(call, device, repeats=repeats, warmup=1 if device.type == "cpu" else 3)
        return ms, p20, p80, f"kv_cache={kv_bytes(model, cache_len, batch, dtype) / 2**20:.1f}MiB ({cache_len} tokens)"

    rows = []
    full_ms, p20, p80, kv = timed(inputs)
    rows.append({**meta, "mode": "full", "provider": "full", "median_ms": full_ms, "p20_ms": p20, "p80_ms": p80,
                 "note": kv})
    for keep in keeps:
        ms, p20, p80, kv = timed(make_inputs(model, text, min(keep, image), batch, dtype, device))
        rows.append({**meta, "mode": f"keep={keep}", "provider": "ceiling", "median_ms": ms, "p20_ms": p20,
                     "p80_ms": p80, "note": f"x{full_ms / ms:.2f} vs full; {kv}; the unpatched model on text + "
                     f"{min(keep, image)} image tokens (no selection): the bound of any pruning"})
        for method in methods:
            if method == "autoselect":
                autoselect.apply(model, selector, keep=keep)
            else:
                autoselect.apply(model, method=method, keep=keep)
            try:
                ms, p20, p80, kv = timed(inputs)
            finally:
                autoselect.revert(model)
            label = "autoselect (untrained AutoSelector, random weights)" if method == "autoselect" else method
            rows.append({**meta, "mode": f"keep={keep}", "provider": method, "median_ms": ms, "p20_ms": p20,
                         "p80_ms": p80, "note": f"x{full_ms / ms:.2f} vs full; {kv}; {label}"})
    return rows
