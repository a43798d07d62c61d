"""Start a vLLM engine with plugin settings that must be refused; print `ERROR [type, message]` if the
engine refuses to start, `STARTED` otherwise.

    python tests/vllm_plugin/bad_config.py MODEL_DIR 'SETTINGS_JSON'   (null: only the environment's)
"""

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes most of the memory


def main(model, settings):
    from vllm import LLM

    kwargs = dict(model=model, dtype="float32", max_model_len=1024, enforce_eager=True)
    if settings is not None:
        kwargs["hf_overrides"] = {"autoselect": settings}
    try:
        LLM(**kwargs)
    except Exception as error:  # report the innermost autoselect error, if vLLM wrapped it
        while error.__cause__ is not None and "autoselect" not in str(error):
            error = error.__cause__
        print("ERROR " + json.dumps([type(error).__name__, str(error)]), flush=True)
        return 0
    print("STARTED", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], json.loads(sys.argv[2])))
