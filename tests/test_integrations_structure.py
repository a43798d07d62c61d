"""The integration's structure (issue 12, item 8): the core names no method, family adapters carry
no method's hooks, a family or a method is one file plus a registry line, and the Hugging Face
helpers (`load_vlm`, `visual_tokens`) live in one shared module used by train, eval, show and demo."""

import inspect
import sys
import types

import pytest
import torch

import autoselect
from autoselect import integrations
from autoselect.integrations import _core, last_selection

import tiny_vlms as T

METHOD_NAMES = ("visionzip", "fastv", "divprune")


def test_core_names_no_method():
    source = inspect.getsource(_core).lower()
    for name in METHOD_NAMES:
        assert name not in source, name
    assert "from ..baselines" not in source and "import baselines" not in source  # the core imports no method


@pytest.mark.parametrize("module", ["llava", "llava_next", "qwen2_vl"])
def test_family_adapters_carry_no_method_hooks(module):
    source = inspect.getsource(__import__(f"autoselect.integrations.{module}", fromlist=["ADAPTER"])).lower()
    for name in METHOD_NAMES:
        assert name not in source, (module, name)


def test_adapters_share_has_images():
    from autoselect.integrations.llava import LlavaAdapter
    from autoselect.integrations.llava_next import LlavaNextAdapter
    from autoselect.integrations.qwen2_vl import Qwen2VLAdapter

    for cls in (LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter):
        assert "has_images" not in vars(cls), cls
    assert issubclass(LlavaAdapter, integrations.FamilyAdapter)


class LastTokenOfLayer:
    """A toy method that needs an extra signal: it records the input of the vision tower's last
    attention through the adapter and keeps the tokens whose recorded input has the largest norm."""

    name = "toy"

    def __init__(self):
        self.records = 0

    def bind(self, adapter, core):
        pass

    def encoding_capture(self, adapter, core):
        from autoselect.integrations import capture_inputs

        method = self

        class Capture:
            def __init__(self, call_kwargs):
                self.call_kwargs = call_kwargs

            def __enter__(self):
                self._ctx = capture_inputs(adapter.vision_attention_module(core))
                self.captured = self._ctx.__enter__()
                return self

            def __exit__(self, *exc):
                return self._ctx.__exit__(*exc)

            def finish(self, features):
                method.records += 1
                hidden = self.captured[-1][0]
                values = hidden.float().norm(dim=-1).reshape(-1)  # one value per tower token
                return adapter.tower_to_features(core, self.call_kwargs, values, features)

        return Capture

    def select(self, features, keep, ctx):
        from autoselect.baselines._common import topk_per_image

        records = ctx.encoding_records()
        return topk_per_image(features, [r.sum(1) for r in records], keep)


def test_a_new_method_is_one_registry_line(monkeypatch):
    from autoselect import baselines

    monkeypatch.setitem(baselines.BASELINES, "toy", LastTokenOfLayer)
    model, make_inputs = T.build("qwen2_vl")
    inputs = make_inputs((1, 1), "left")
    with autoselect.pruned(model, method="toy", keep=2):
        with torch.no_grad():
            out = model(**inputs)
        assert [len(i) for i in last_selection(model).index] == [2, 2]
    assert out.logits.shape[1] < inputs["input_ids"].shape[1]


def test_a_new_family_is_one_registry_line(monkeypatch):
    module = types.ModuleType("autoselect.integrations._toy_family")
    from autoselect.integrations.llava import LlavaAdapter

    class Toy(LlavaAdapter):
        name = "toy_llava"

    module.ADAPTER = Toy()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(integrations.ADAPTERS, "toy_llava", "_toy_family")
    model, make_inputs = T.build("llava")
    monkeypatch.setattr(model.config, "model_type", "toy_llava")
    inputs = make_inputs((1, 1), "left")
    with autoselect.pruned(model, method="norm", keep=2):
        with torch.no_grad():
            assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1] - 14


def test_hf_helpers_are_shared():
    from autoselect import demo, evaluation, hf, show
    from autoselect.training import trainer

    assert callable(hf.load_vlm) and callable(hf.visual_tokens)
    for module in (demo, evaluation, show, trainer):
        source = inspect.getsource(module)
        assert "def load_vlm" not in source and "def visual_tokens" not in source
        assert "training.trainer import load_vlm" not in source and "trainer import visual_tokens" not in source
    assert trainer.load_vlm is hf.load_vlm  # still importable from the trainer
