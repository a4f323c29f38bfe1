# `make run`: set up and run the whole pipeline (embedded profile by default). `make test`: set up and test.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# Stages call `nlistral`, `dvc` etc. from the venv without activating it.
export PATH := $(BIN):$(PATH)
# Nothing phones home (DVC's analytics are off in .dvc/config).
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: setup run test params lint browser mutation

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "NLIstral needs Python >= 3.10"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@# Byte-compile once, on every core: PYTHONDONTWRITEBYTECODE=1 machines never write .pyc files at import, so an
	@# uncompiled venv recompiles torch, transformers, pandas... in every process (`import pandas` 3.3 s -> 1.0 s).
	@# The one file skipped is Python 3.12 syntax in torch's own test helpers.
	$(BIN)/python -m compileall -q -j 0 -x 'py312_intrinsics' $(VENV)/lib
	touch $@

run: setup
	dvc repro
	@echo
	dvc metrics show metrics/eval.json
	@echo
	@# the extra test sets (eval.test_sets): accuracy per set, model and tag, from reports/results.md
	@sed -n '/^## Extra test sets/,/^## Data funnel/p' reports/results.md | sed '$$d'
	@echo "Test sets: metrics/test_sets/<set>.json (per model, per tag, comparisons), predictions in metrics/test_sets/<set>/"
	@echo "Outputs: data/{original_thoughts,reflected_thoughts,finetune}/, models/adapter/, metrics/"
	@echo "Metrics: $(VENV)/bin/dvc metrics show (every stage)    Plots: $(VENV)/bin/dvc plots show"
	@echo "Runs:    $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db, then open http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning"
	@echo "Report:  reports/results.md, reports/index.html (open in a browser), model and dataset cards"

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/pytest

params: setup
	nlistral params

# Mutation testing (not in CI: slow, ~1 h on 2 cores): mutmut (pinned in requirements.txt) changes the modules whose
# bugs would silently change results, one small edit at a time, and runs the unit tests that cover each edit
# (pyproject.toml [tool.mutmut]). One module at a time; then the survivors per module: `mutmut show NAME` shows one.
MUTATED := stats scoring parsing data prompts stages.sft
mutation: setup
	for m in $(MUTATED); do HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 mutmut run --max-children 2 "nlistral.$$m.*" || exit 1; done
	@mutmut results --all true | awk -F ': ' '{ split($$1, n, "."); m = n[2] (n[2] == "stages" ? "." n[3] : ""); \
		count[m "\t" $$2]++ } END { for (k in count) print k "\t" count[k] }' | sort

# The report page's test runs in a real headless Chromium: Debian's package (root; CI runs this from .ci/run).
browser:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

lint: setup
	@# no merge-conflict marker left in a tracked file (a README once shipped with one)
	! git grep -nE '^(<{7}|>{7})( |$$)'
	ruff check .
	mypy

# The model server's own environment for eval.engine=server (README: Evaluation): vLLM pins its own torch and
# transformers (requirements-vllm.txt), so it never shares .venv. A CUDA machine; run it as `.venv-vllm/bin/vllm`.
.PHONY: vllm-env
vllm-env: .venv-vllm/.installed

.venv-vllm/.installed: requirements-vllm.txt
	test -x .venv-vllm/bin/python || $(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install --quiet -r requirements-vllm.txt
	touch $@
