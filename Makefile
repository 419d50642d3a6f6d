# The two commands that matter: `make run` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   := demo/shapes

.PHONY: run test lint venv demo train-demo schemas docker-smoke k8s-e2e compare bench bench-quick clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

## run: start the daemon on this machine (CPU, config.yaml): drop datasets into inbox/, results in outbox/
run: $(STAMP)
	$(BIN)/dropfit serve --config config.yaml

## test: the whole suite (real TensorFlow training on generated images)
test: $(STAMP)
	$(BIN)/python -m pytest

## compare: train the recipe and the default job on the same data; print held-out accuracy side by side
compare: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/compare_models.py --json bench/results/compare.json

## bench: input pipeline, training throughput and daemon overhead against the recipe; writes bench/results/latest.*
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/run.py

## bench-quick: the same measurements on a smaller dataset (a few minutes)
bench-quick: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/run.py --quick

## docker-smoke: build the image on a debootstrap base and run a job through the compose service (root, Debian)
docker-smoke: $(STAMP)
	PYTHON=$(abspath $(BIN)/python) docker/smoke-test.sh

## k8s-e2e: the Kubernetes runner against a real cluster ($$KUBECONFIG, $$DROPFIT_IMAGE; see tests/k8s/test_k8s_e2e.py)
k8s-e2e: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider -rA tests/k8s/test_k8s_e2e.py

lint: $(STAMP)
	$(BIN)/ruff check .

## demo: drop a small generated dataset into the running daemon's inbox
demo: $(STAMP)
	$(BIN)/dropfit demo --config config.yaml

## train-demo: no daemon, just train on a generated dataset from the terminal (results in runs/demo)
train-demo: $(STAMP)
	@test -d $(DEMO) || $(BIN)/python -m trainer demo $(DEMO)
	$(BIN)/python -m trainer train $(DEMO) --target-size 64 --epochs 15 --batch-size 16 --out runs/demo

## schemas: regenerate the JSON Schemas of job.yaml and config.yaml after changing their models
schemas: $(STAMP)
	$(BIN)/python -m trainer schema > contract/schemas/job.schema.json
	$(BIN)/python -m trainer schema predict > contract/schemas/predict.schema.json
	$(BIN)/python -c 'import json; from daemon.config import Config; print(json.dumps(Config.model_json_schema(), indent=2))' > daemon/schemas/config.schema.json

clean:
	rm -rf $(VENV) runs demo .pytest_cache .ruff_cache
