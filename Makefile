PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DATA   ?= data/demo
STORE  ?= model_store/demo

.PHONY: install run test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e ".[dev,ray]"
	$(BIN)/python -c "import open_clip, peft, diffusers"
	touch $@

install: $(VENV)/.installed

# The demo: world (if missing) -> pretrain -> zoo -> fit -> evaluate; a rerun skips what is up to date.
# Then serve the store on http://127.0.0.1:8000 (WILDPDIFF_* environment variables for the settings).
run: install
	test -f $(DATA)/tasks.json || $(BIN)/wildpdiff world --profile demo --out $(DATA)
	$(BIN)/wildpdiff pipeline --data $(DATA) --store $(STORE) --profile demo
	$(BIN)/wildpdiff serve --store $(STORE)

test: install
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .

# Speed, memory and accuracy ratios against the built store -> bench/results/ (quick: ~3 min on 2 cores).
# BENCH_ARGS=--full measures every location and the memory of every smoke-pipeline stage.
bench: install
	$(BIN)/python -m bench.run --data $(DATA) --store $(STORE) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
