# Every command of the project. A fresh CPU machine needs only python3 (3.10+)
# and pip; nvcc is optional (with it, fastllm._C gets its CUDA kernels).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU build of PyTorch (override: make TORCH="torch==X.Y.Z"); on a CUDA machine see the README.
TORCH  ?= torch==2.13.0

.PHONY: all install build run test asan lint format bench gpu-check clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# reinstalled (and fastllm._C rebuilt) only when the build inputs change
STAMP := $(VENV)/.fastllm-installed
$(STAMP): $(PY) pyproject.toml setup.py $(shell find csrc -type f)
	$(PY) -m pip install -q "$(TORCH)" pybind11 "setuptools>=64"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(STAMP)

# rebuild fastllm._C in place, showing every compiler command (pip install hides them)
build: install
	$(PY) setup.py build_ext --inplace

# main job on the built-in default: what this machine has, then the float model against
# each fastllm configuration (all-MiniLM-L6-v2, shipped by a pip package)
run: install
	$(VENV)/bin/fastllm doctor
	$(VENV)/bin/fastllm optimize

test: install
	$(PY) -m pytest -q

# the C++ CPU kernels built with AddressSanitizer (a build of their own, under build/asan),
# run by every test of the cpu backend, the robustness tests' hostile inputs included: an
# out-of-bounds access is a failure, not a wrong number
ASAN_TESTS ?= -k cpu tests/test_robustness.py tests/test_attention.py \
	tests/test_native_attention.py tests/test_quant.py tests/test_native_int8.py tests/test_int8.py
asan: install
	FASTLLM_NO_CUDA=1 FASTLLM_SANITIZE=address $(PY) setup.py -q build_ext \
		--build-lib build/asan --build-temp build/asan/tmp
	FASTLLM_NATIVE_LIB="$$(ls build/asan/fastllm/_C*.so)" \
	LD_PRELOAD="$$($${CXX:-g++} -print-file-name=libasan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	$(PY) -m pytest -q -p no:cacheprovider $(ASAN_TESTS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check fastllm tests bench setup.py

format: install
	$(VENV)/bin/ruff format fastllm tests bench setup.py
	$(VENV)/bin/ruff check --fix .

bench: install
	$(VENV)/bin/fastllm bench

# on a GPU machine with torch and triton already installed (no network needed)
gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf build dist *.egg-info fastllm/_C*.so fastllm-bench-results
