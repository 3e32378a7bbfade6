# Two entry points (see README): `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.astra-installed
PYTEST_ARGS ?=

.PHONY: demo test bench aot clean

$(STAMP): pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.h)
	$(PYTHON) -m venv --system-site-packages $(VENV)
	# Keep an existing torch (e.g. a CUDA build); with none, take the CPU build, never a CUDA download: PyPI's
	# torch wheels for Linux x86_64 pull the CUDA packages, PyTorch's CPU index serves the +cpu build (a pip
	# configuration's find-links / extra indexes still apply; --retries 0: an index that is not reachable fails fast)
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install "torch==2.13.0" --retries 0 \
		--index-url https://download.pytorch.org/whl/cpu
	$(VPY) -m pip install -e ".[test]"
	touch $@

demo: $(STAMP)
	$(VPY) -m astra demo

test: $(STAMP)
	$(VPY) -m pytest tests $(PYTEST_ARGS)

bench: $(STAMP)
	$(VPY) -m pytest bench --benchmark-only

aot: $(STAMP)
	$(VPY) -m astra_kernels.aot

clean:
	rm -rf $(VENV) build *.egg-info astra_kernels/_*.so
