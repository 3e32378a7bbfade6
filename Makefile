# Two entry points (see README): `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.astra-installed
PYTEST_ARGS ?=

.PHONY: demo test bench aot clean

$(STAMP): pyproject.toml setup.py CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.h)
	$(PYTHON) -m venv --system-site-packages $(VENV)
	# Keep an existing torch (e.g. a CUDA build); with none, take the CPU build, never a CUDA download.
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install "torch==2.13.0"
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
