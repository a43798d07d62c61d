"""AutoSelect in vLLM: an out-of-tree plugin that serves VLMs with pruned visual tokens.

    pip install autoselect[vllm]
    vllm serve llava-hf/llava-1.5-7b-hf \\
        --hf-overrides '{"autoselect": {"method": "autoselect", "selector": "/path/to/selector", "keep": 64}}'

or, in Python, `LLM(model, hf_overrides={"autoselect": {...}})`; the environment variables
AUTOSELECT_METHOD / AUTOSELECT_SELECTOR / AUTOSELECT_KEEP / AUTOSELECT_SEED work where the
configuration cannot be passed (see `autoselect.vllm.config` for every key and check).

vLLM loads the plugin through the `vllm.general_plugins` entry point (`register`) in every process it
starts; `register` re-registers the supported architectures with pruning subclasses of vLLM's own
(`autoselect.vllm.models`, imported lazily by name): LLaVA-1.5 (`LlavaForConditionalGeneration`),
LLaVA-NeXT (`LlavaNextForConditionalGeneration`), Qwen2-VL (`Qwen2VLForConditionalGeneration`) and
Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`).
Methods: "autoselect" (a selector saved with `AutoSelector.save_pretrained`), "random", "norm",
"divprune"; "fastv" and "visionzip" are refused (they read attention weights vLLM does not return).
Positions: Qwen2-VL and Qwen2.5-VL keep the kept tokens' unpruned M-RoPE positions, as `autoselect.apply` does;
LLaVA's 1-D positions are the pruned prompt's (`autoselect.apply(..., positions="compact")` gives the
same on the Hugging Face path).
"""

ARCHITECTURES = {
    "LlavaForConditionalGeneration": "autoselect.vllm.models:AutoSelectLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "autoselect.vllm.models:AutoSelectLlavaNextForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": "autoselect.vllm.models:AutoSelectQwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "autoselect.vllm.models:AutoSelectQwen2_5_VLForConditionalGeneration",
}


def register() -> None:
    """The `vllm.general_plugins` entry point: register the pruning model classes under vLLM's
    architecture names (idempotent; vLLM calls it in every process)."""
    from vllm import ModelRegistry

    for architecture, target in ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, target)
    _enable_cpu_pruning_hook()


def _enable_cpu_pruning_hook() -> None:
    """vLLM 0.32's GPU runner turns its multimodal-pruning hook on after loading a model that supports
    it (`recompute_mrope_positions`: the kept tokens' M-RoPE positions); its CPU runner skips that
    step. Do it there too, once, after the CPU runner's own load_model."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    if getattr(CPUModelRunner.load_model, "_autoselect", False):
        return
    original = CPUModelRunner.load_model

    def load_model(self, *args, **kwargs):
        from vllm.model_executor.models.interfaces import supports_multimodal_pruning

        result = original(self, *args, **kwargs)
        mm_config = self.model_config.multimodal_config
        self.is_multimodal_pruning_enabled = bool(
            supports_multimodal_pruning(self.get_model()) and mm_config is not None
            and mm_config.is_multimodal_pruning_enabled())
        return result

    load_model._autoselect = True
    CPUModelRunner.load_model = load_model


__all__ = ["ARCHITECTURES", "register"]
