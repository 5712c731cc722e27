# Two commands for a fresh machine: `make demo` (set up + run the demo study), `make test` (set up + run tests).
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= $(abspath ../shared/data)
PAPER_RESULTS ?= $(abspath ../shared/reference/paper_results.csv)
OUT ?= out/demo

.PHONY: setup demo test lint bench clean

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	./scripts/setup.sh
	touch $@

setup: $(VENV)/.installed

demo: setup
	QUANTSAFE_DATA_DIR=$(DATA_DIR) QUANTSAFE_PAPER_RESULTS=$(PAPER_RESULTS) HF_HUB_OFFLINE=1 $(VENV)/bin/quantsafe run studies/demo.yaml --out $(OUT)
	@echo "report: $(OUT)/report.md"

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

test: setup lint
	QUANTSAFE_DATA_DIR=$(DATA_DIR) HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q

bench: setup
	QUANTSAFE_DATA_DIR=$(DATA_DIR) HF_HUB_OFFLINE=1 $(PY) bench/generation.py
	QUANTSAFE_DATA_DIR=$(DATA_DIR) HF_HUB_OFFLINE=1 $(PY) bench/judges.py
	QUANTSAFE_DATA_DIR=$(DATA_DIR) HF_HUB_OFFLINE=1 $(PY) bench/quantize.py

clean:
	rm -rf $(VENV) out
