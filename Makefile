# Two commands set up and run everything on a fresh machine:
#   make demo   - create .venv (CPU torch first), install visprune, run the main job
#   make test   - the whole CPU test suite (what CI runs)
# A cluster user installs their CUDA torch first and then `pip install -e .[gpu]` instead.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo toy test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# CPU torch first: otherwise pip resolves transformers/peft/deepspeed to a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# torchvision (the Qwen2-VL / InternVL processors need it; extra "vision") is not installed: PyPI's x86_64
	# wheels are CUDA builds that do not import beside the CPU torch, and the CPU wheel index is out of reach.
	# Where your torch's index is reachable: pip install -c <(echo $(TORCH_PIN)) "torchvision==0.28.*"
	# the lmms-eval plugin's tests: lmms-eval without its torchvision dependency (which would replace CPU torch)
	$(BIN)/python -m pip install --quiet --no-deps "lmms-eval==0.7.3"
	$(BIN)/python -m pip install --quiet loguru pytz evaluate sacrebleu tenacity pytablewriter
	touch $(STAMP)

install: $(STAMP)

# The main job: the see-task accuracy-vs-FLOPs experiment on CPU (report.md + pareto.png).
demo: $(STAMP)
	$(BIN)/visprune demo --out runs/demo

# The toy pipeline in about a minute: FLOPs of LLaVA-1.5-7B, tiny local model + data, 60 training
# steps at a 25% budget, harden, then answer with the hardened model beside the gated reference.
toy: $(STAMP)
	$(BIN)/visprune flops llava-1.5-7b
	$(BIN)/visprune data toy --out runs/toy-inputs
	$(BIN)/visprune train recipes/toy/flops25.yaml
	$(BIN)/visprune harden runs/toy-flops25/checkpoint-60 --out runs/toy-v25
	$(BIN)/python examples/generate_pruned.py runs/toy-v25 runs/toy-inputs/data/train.json runs/toy-inputs/data/images

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check modeling trainer data_prep experiments tests

clean:
	rm -rf $(VENV) build *.egg-info
