"""Hugging Face helpers shared by `autoselect train`, `eval`, `show` and `demo`: load a local VLM
(offline), freeze it, and get its visual tokens as the projector gives them (the tokens a
"projector_output" selector scores; a "projector_input" selector scores the projector's input, see
`autoselect.training.trainer.placement_tokens` and `autoselect.integrations._selector`, DESIGN.md 1)."""

import torch


def freeze(model):
    """Eval mode and requires_grad off for every parameter; returns the model."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def load_vlm(path: str, dtype: torch.dtype = torch.float32, device="cpu"):
    """(model, processor) from a local folder (nothing downloads), frozen: eval mode, no parameter
    requires grad."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=dtype)
    return freeze(model.to(device)), processor


@torch.no_grad()
def visual_tokens(model, pixel_values) -> torch.Tensor:
    """The projector's output for a batch of equally sized images: (B, N, D), no gradient."""
    output = model.get_image_features(pixel_values=pixel_values.to(model.device, model.dtype), return_dict=True)
    features = output.pooler_output if hasattr(output, "pooler_output") else output
    if isinstance(features, (list, tuple)):
        features = torch.stack(list(features))
    return features


__all__ = ["freeze", "load_vlm", "visual_tokens"]
