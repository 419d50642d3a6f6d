# The two commands that matter: `make run` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   := demo/shapes

.PHONY: run test lint venv demo clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

## run: train a model on a generated demo dataset; results in runs/demo
run: $(STAMP)
	@test -d $(DEMO) || $(BIN)/python -m trainer demo $(DEMO)
	$(BIN)/python -m trainer train $(DEMO) --target-size 64 --epochs 15 --batch-size 16 --out runs/demo

## test: the whole suite (real TensorFlow training on generated images)
test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

demo: $(STAMP)
	$(BIN)/python -m trainer demo $(DEMO)

clean:
	rm -rf $(VENV) runs demo .pytest_cache .ruff_cache
