# `make run`: set up and run the whole pipeline (embedded profile by default). `make test`: set up and test.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# Stages call `nlistral`, `dvc` etc. from the venv without activating it.
export PATH := $(BIN):$(PATH)
# Nothing phones home (DVC's analytics are off in .dvc/config).
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: setup setup-dev lock run test params lint docs browser mutation screenshot

# The environment is locked: requirements.txt pins every package `make run` needs (the runtime), requirements-dev.txt
# adds the tests' and tools' on top; both are generated from requirements*.in by `make lock` (pip-tools) for
# Linux x86_64 and CPython 3.11. torch is pinned by version only (2.13.0): pip takes the CPU build this machine's
# pip configuration offers, and PyPI's CUDA build (with the nvidia-* wheels it pins) on a GPU box.
setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	@# the lock's packages (numpy, pandas, scipy, transformers...) need 3.11: say so before pip fails on them
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "NLIstral needs Python >= 3.11; $(PYTHON) is " + sys.version.split()[0] + ": make run PYTHON=python3.11")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@# Byte-compile once, on every core: PYTHONDONTWRITEBYTECODE=1 machines never write .pyc files at import, so an
	@# uncompiled venv recompiles torch, transformers, pandas... in every process (`import pandas` 3.3 s -> 1.0 s).
	@# The one file skipped is Python 3.12 syntax in torch's own test helpers.
	$(BIN)/python -m compileall -q -j 0 -x 'py312_intrinsics' $(VENV)/lib
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-compile -r requirements-dev.txt -c constraints.txt
	$(BIN)/python -m compileall -q -j 0 -x 'py312_intrinsics' $(VENV)/lib
	touch $@

# Regenerate the locks after editing requirements*.in (pins already in a lock stay unless the .in asks otherwise;
# `make lock LOCK_ARGS=--upgrade` moves every unpinned package to its newest release).
PIP_COMPILE = CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links \
	--no-emit-trusted-host --no-emit-options -c constraints.txt $(LOCK_ARGS)
lock: setup-dev
	$(PIP_COMPILE) -o requirements.txt requirements.in
	$(PIP_COMPILE) -o requirements-dev.txt requirements-dev.in
	@# the version, not this machine's local CPU build of it (2.13.0+cpu): a GPU box installs PyPI's CUDA build
	sed -i 's/^torch==\(.*\)+cpu$$/torch==\1/' requirements.txt requirements-dev.txt

# One CPU thread, as the tests: the committed results come out byte for byte (docs/experiments.md: Committed results)
run: setup
	OMP_NUM_THREADS=1 dvc repro
	@echo
	@nlistral summary

# Two pytest-xdist workers, each test file on one of them, so a module fixture (the pipeline run, a trained adapter) is
# built once; `make test PYTEST_ARGS=` runs the suite in one process.
PYTEST_ARGS ?= -n 2 --dist loadfile
test: setup-dev
	HF_HUB_OFFLINE=1 $(BIN)/pytest $(PYTEST_ARGS)

params: setup
	nlistral params

# Mutation testing (not in CI: slow, ~1 h on 2 cores): mutmut (pinned in requirements-dev.in) changes the modules whose
# bugs would silently change results, one small edit at a time, and runs the unit tests that cover each edit
# (pyproject.toml [tool.mutmut]). One module at a time; then the survivors per module: `mutmut show NAME` shows one.
MUTATED := stats scoring parsing data prompts stages.sft
mutation: setup-dev
	for m in $(MUTATED); do HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 mutmut run --max-children 2 "nlistral.$$m.*" || exit 1; done
	@mutmut results --all true | awk -F ': ' '{ split($$1, n, "."); m = n[2] (n[2] == "stages" ? "." n[3] : ""); \
		count[m "\t" $$2]++ } END { for (k in count) print k "\t" count[k] }' | sort

# The report page's test runs in a real headless Chromium: Debian's package (root; CI runs this from .ci/run).
browser:
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)

# docs/img/report.png, the README's picture of the report page: the page of the committed embedded run (`make run`
# first), in Debian's headless chromium (`make browser`).
screenshot: reports/index.html
	chromium --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
		--no-first-run --hide-scrollbars --window-size=1200,900 --screenshot=docs/img/report.png \
		file://$(CURDIR)/reports/index.html

# .pre-commit-config.yaml: no conflict markers, YAML/TOML parse, whitespace, ruff check + format, the docs build
lint: setup-dev
	pre-commit run --all-files --show-diff-on-failure
	mypy

# The documentation site (docs/, mkdocs.yml) -> .site/; `$(BIN)/mkdocs serve` previews it at http://127.0.0.1:8000
docs: setup-dev
	mkdocs build --strict

# The model server's own environment for eval.engine=server (docs/evaluation.md: Evaluation): vLLM pins its own torch and
# transformers (requirements-vllm.txt), so it never shares .venv. A CUDA machine; run it as `.venv-vllm/bin/vllm`.
.PHONY: vllm-env
vllm-env: .venv-vllm/.installed

.venv-vllm/.installed: requirements-vllm.txt
	test -x .venv-vllm/bin/python || $(PYTHON) -m venv .venv-vllm
	.venv-vllm/bin/python -m pip install --quiet -r requirements-vllm.txt
	touch $@

# The Docker image (Dockerfile; docs/real-setup.md: Docker), with docker where its daemon answers, else podman, as your
# UID/GID. BASE=...: another base image, e.g. localhost/nlistral-base, which scripts/base-image.sh makes from Debian's
# packages where no registry is reachable. ENGINE: the engine with its global flags; IMAGE_ARGS: more build flags.
# The CA bundle pip uses here (PIP_CERT) goes in as a build secret, never into a layer.
.PHONY: image image-lock image-test
comma := ,
IMAGE ?= nlistral
ENGINE ?= $(shell docker info >/dev/null 2>&1 && echo docker || echo podman)
IMAGE_UID ?= $(shell id -u)
IMAGE_GID ?= $(shell id -g)
image:
	$(ENGINE) build $(if $(BASE),--build-arg BASE=$(BASE)) --build-arg UID=$(IMAGE_UID) --build-arg GID=$(IMAGE_GID) \
		$(if $(PIP_CERT),--secret id=ca$(comma)src=$(PIP_CERT)) $(IMAGE_ARGS) -t $(IMAGE) .

# requirements-image.txt: requirements.txt's pins resolved against PyPI alone (its CUDA torch and nvidia-* wheels, for
# Linux x86_64 and CPython 3.11), each with its file's sha256, for the image's --require-hashes install; no local
# wheel folder or pip configuration of this machine takes part (scripts/image-lock.py says why not pip-compile).
# Run it after `make lock`.
image-lock: setup
	$(BIN)/python scripts/image-lock.py

# Builds the image for UID 1000 when run as root (else for yours) and runs `nlistral --help`, Triton's C build and the
# embedded `dvc repro` in it on a clone owned by that UID (tests/test_image.py; slow, not part of `make test`). Same
# variables as `make image`; IMAGE_RUN_ARGS: flags for `run`.
image-test: setup-dev
	NLISTRAL_IMAGE_TEST=1 ENGINE="$(ENGINE)" BASE="$(BASE)" IMAGE_ARGS="$(IMAGE_ARGS)" IMAGE_RUN_ARGS="$(IMAGE_RUN_ARGS)" \
		$(BIN)/pytest -p no:cacheprovider tests/test_image.py
