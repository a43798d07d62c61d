"""What the vLLM plugin is told to do, and the checks it makes at engine start (no vLLM import here).

The configuration comes from vLLM's own model configuration, or from the environment:

- `hf_overrides={"autoselect": {"method": "autoselect", "selector": "/path/to/selector", "keep": 64}}`
  (`vllm serve MODEL --hf-overrides '{"autoselect": {...}}'`): read from the model's Hugging Face
  config, so it travels with the engine's configuration to every worker and tensor-parallel rank;
- otherwise the environment variables AUTOSELECT_METHOD, AUTOSELECT_SELECTOR, AUTOSELECT_KEEP,
  AUTOSELECT_SEED (read by every process that builds the model).

Neither given: the plugin's model classes behave exactly as vLLM's own (no pruning). Keys:

- `method`: "autoselect" (a trained selector), or a training-free baseline that needs no attention
  maps: "random", "norm", "divprune". REFUSED inside vLLM, with the reason: "fastv" (it reads the
  attention of the last prompt token at a language-model layer: vLLM's paged attention kernels return
  no attention weights, and dropping tokens after layer K would shrink a KV cache vLLM has already
  allocated for every layer) and "visionzip" (it reads the vision tower's attention weights, which
  vLLM's fused vision attention does not return).
- `selector`: the folder of an `AutoSelector.save_pretrained` (method "autoselect" only).
- `keep`: tokens kept per image, an int >= 1 (an image with fewer keeps all), or a fraction in (0, 1].
- `seed`: the random baseline's seed (each image is drawn with a generator seeded with it).

Every problem is a ValueError naming it, raised while the engine builds the model, before any
request is served.
"""

import dataclasses
import json
import os
from typing import Any, Mapping, Optional, Union

from ..integrations._core import image_budget, normalize_keep

CONFIG_KEY = "autoselect"
ENV = {"method": "AUTOSELECT_METHOD", "selector": "AUTOSELECT_SELECTOR", "keep": "AUTOSELECT_KEEP",
       "seed": "AUTOSELECT_SEED"}
METHODS = ("autoselect", "random", "norm", "divprune")
REFUSED = {
    "fastv": "FastV reads the attention of the last prompt token at a language-model layer; vLLM's paged "
             "attention kernels return no attention weights, and dropping tokens after layer K would shrink "
             "a KV cache vLLM has already allocated for every layer",
    "visionzip": "VisionZip reads the vision tower's attention weights, which vLLM's fused vision attention "
                 "does not return",
}
WHERE = "autoselect vLLM plugin"


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """One engine's pruning: `method`, `keep` (int or fraction), `selector` (a folder, for
    "autoselect"), `seed` (random), and where it came from (`source`, for error messages)."""

    method: str
    keep: Union[int, float]
    selector: Optional[str] = None
    seed: int = 0
    source: str = "hf_overrides"

    def budget(self, num_tokens: int) -> int:
        """Tokens kept of an image of `num_tokens` (as `autoselect.apply`)."""
        return image_budget(self.keep, int(num_tokens))

    def to_dict(self) -> dict:
        return {"method": self.method, "keep": self.keep, "selector": self.selector, "seed": self.seed}


def _from_env() -> Optional[dict]:
    raw = {key: os.environ.get(name) for key, name in ENV.items()}
    if all(v is None or v == "" for v in raw.values()):
        return None
    out: dict = {}
    for key, value in raw.items():
        if value is None or value == "":
            continue
        if key in ("keep", "seed"):
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError(f"{WHERE}: {ENV[key]}={value!r} is not a number") from None
        out[key] = value
    return out


def raw_config(hf_config: Any) -> tuple:
    """(the settings dict, its source) from the model's Hugging Face config (`hf_overrides`), else
    from the environment; (None, None) when neither configures pruning."""
    given = getattr(hf_config, CONFIG_KEY, None) if hf_config is not None else None
    if given is not None:
        if isinstance(given, str):
            try:
                given = json.loads(given)
            except ValueError:
                raise ValueError(f"{WHERE}: hf_overrides[{CONFIG_KEY!r}] must be a dict (or its JSON), got "
                                 f"{given!r}") from None
        if not isinstance(given, Mapping):
            raise ValueError(f"{WHERE}: hf_overrides[{CONFIG_KEY!r}] must be a dict, got {type(given).__name__}")
        return dict(given), "hf_overrides"
    env = _from_env()
    return (env, "environment") if env is not None else (None, None)


def parse(settings: Optional[Mapping], source: str = "hf_overrides") -> Optional[PruneConfig]:
    """Check a settings dict (see the module docstring) and return its PruneConfig (None: no pruning).
    Raises ValueError for an unknown key or method, a refused method (with the reason), a bad keep or
    seed, a missing selector, or a selector given to a baseline."""
    if settings is None:
        return None
    unknown = sorted(set(settings) - set(ENV))
    if unknown:
        raise ValueError(f"{WHERE}: unknown setting(s) {unknown} in {source}; known: {sorted(ENV)}")
    method = settings.get("method", "autoselect")
    if method in REFUSED:
        raise ValueError(f"{WHERE}: method {method!r} cannot work inside vLLM: {REFUSED[method]}. Use one of "
                         f"{list(METHODS)} (or autoselect.apply with Hugging Face transformers)")
    if method not in METHODS:
        raise ValueError(f"{WHERE}: unknown method {method!r} in {source}; choose one of {list(METHODS)}")
    if "keep" not in settings:
        raise ValueError(f"{WHERE}: no keep in {source}: give the tokens kept per image (an int >= 1) or a "
                         "fraction in (0, 1]")
    try:
        keep = normalize_keep(settings["keep"], where=WHERE)
    except TypeError as error:
        raise ValueError(str(error)) from None
    seed = settings.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{WHERE}: seed must be an int, got {seed!r}")
    selector = settings.get("selector")
    if method == "autoselect":
        if not selector:
            raise ValueError(f"{WHERE}: method 'autoselect' needs a selector: the folder of an "
                             f"AutoSelector.save_pretrained ({source}: 'selector' / {ENV['selector']})")
        selector = os.fspath(selector)
        if not os.path.isfile(os.path.join(selector, "config.json")):
            raise ValueError(f"{WHERE}: selector folder {selector!r} does not exist or has no config.json "
                             "(write one with AutoSelector.save_pretrained)")
    elif selector:
        raise ValueError(f"{WHERE}: a selector was given for method {method!r}, which uses none")
    return PruneConfig(method=method, keep=keep, selector=selector, seed=seed, source=source)


def from_hf_config(hf_config: Any) -> Optional[PruneConfig]:
    """The engine's PruneConfig (None: no pruning), from `hf_overrides` or the environment."""
    settings, source = raw_config(hf_config)
    return parse(settings, source)
