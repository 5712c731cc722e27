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

# llama-cpp-python[server], for the HTTP backend's tests against a real OpenAI-compatible server; the wheel
# compiles once per CPU (~9 min on 2 cores) and is cached under ~/.cache/quantsafe/wheels.
$(VENV)/.llama-server: scripts/llama_server.sh $(VENV)/.installed
	VENV=$(VENV) ./scripts/llama_server.sh
	touch $@

demo: setup
	QUANTSAFE_DATA_DIR=$(DATA_DIR) QUANTSAFE_PAPER_RESULTS=$(PAPER_RESULTS) HF_HUB_OFFLINE=1 $(VENV)/bin/quantsafe run studies/demo.yaml --out $(OUT)
	@echo "report: $(OUT)/report.md"

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

# Debian's chromium (if missing) and Playwright for Python, for the browser tests (annotation app, report.html).
$(VENV)/.browser: scripts/browser.sh $(VENV)/.installed
	VENV=$(VENV) ./scripts/browser.sh
	touch $@

test: setup lint $(VENV)/.llama-server $(VENV)/.browser
	OMP_WAIT_POLICY=PASSIVE QUANTSAFE_DATA_DIR=$(DATA_DIR) HF_HUB_OFFLINE=1 QUANTSAFE_REQUIRE_LLAMA_SERVER=1 \
	  QUANTSAFE_REQUIRE_BROWSER=1 $(VENV)/bin/pytest -q

bench: setup
	QUANTSAFE_DATA_DIR=$(DATA_DIR) HF_HUB_OFFLINE=1 $(PY) bench/generation.py
	QUANTSAFE_DATA_DIR=$(DATA_DIR) HF_HUB_OFFLINE=1 $(PY) bench/judges.py
	QUANTSAFE_DATA_DIR=$(DATA_DIR) HF_HUB_OFFLINE=1 $(PY) bench/quantize.py
	DISABLE_CUDA=1 $(VENV)/bin/pip install -q -e ".[bench]"
	QUANTSAFE_DATA_DIR=$(DATA_DIR) HF_HUB_OFFLINE=1 $(PY) bench/quantizers.py

clean:
	rm -rf $(VENV) out
