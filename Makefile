# Two commands do everything on a fresh machine:
#   make demo   set up, then `autoselect demo`: the shipped tiny VLM and selector evaluated against the
#               baselines at keep 192/128/64, the prefill speed-up and a picture of the kept tokens (demo/)
#   make test   set up, then the test suite
# Set-up: a virtual environment in .venv (sharing the system's packages when the system Python already
# has torch, e.g. a CUDA build, which is then used and gets the CUDA kernels built), torch==2.13.0
# where no torch is present (the CPU build), and the package with its compiled extension.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.autoselect-installed
SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu) setup.py pyproject.toml autoselect/_build_flags.py

.PHONY: demo test bench install clean

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
