# Set-up and test entry points. `make test` is what CI (.ci/run) and newcomers run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast test-lower-bound demo serve bench bench-quick espeak clean-venv

# (Re)install when the venv is missing or the dependency files changed.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 --durations=15 tests

# transformers' lower bound (pyproject: transformers>=5.17): the runtime's transformers tests again with exactly
# 5.17.0 (and the huggingface-hub 1.x it requires) put in front of the venv's newer pins; .ci/run runs this.
TRANSFORMERS_LOWER := 5.17.0
HF_HUB_LOWER := 1.5.0
LOWER := $(VENV)/lower-bound
test-lower-bound: $(STAMP)
	$(PY) -m pip install --quiet --no-deps --upgrade --target $(LOWER) transformers==$(TRANSFORMERS_LOWER) huggingface-hub==$(HF_HUB_LOWER)
	PYTHONPATH=$(LOWER) $(PY) -c "import transformers as t; assert t.__version__ == '$(TRANSFORMERS_LOWER)', t.__version__"
	PYTHONPATH=$(LOWER) $(PY) -m pytest -n 2 tests/test_torch_infer_runtime.py tests/test_torch_infer_transformers_api.py

# The quick tier while editing: everything but the tests marked `slow` (about 4 minutes on 2 cores; docs/testing.md).
test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -m "not slow" tests

# The whole product end to end on a synthesised speech corpus (about 14 minutes on 2 CPU cores from a fresh clone); see README.
demo: $(STAMP) espeak
	$(PY) scripts/demo.py

# Serve the demo's torch package (after `make demo`): web page and API on http://127.0.0.1:8000/
serve: $(STAMP)
	@test -f demo/package/config.json || { echo "no demo/package: run 'make demo' first"; exit 2; }
	$(VENV)/bin/osum-serve demo/package --port 8000 --feedback-log demo/feedback.jsonl

# Debian's espeak-ng makes the demo's speech; installed with apt when missing (as root, or through sudo).
espeak:
	@command -v espeak-ng >/dev/null 2>&1 || { \
	  echo "espeak-ng not found: installing it with apt-get"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq espeak-ng; } \
	  || { echo "could not install espeak-ng; install it (e.g. apt-get install espeak-ng) and re-run"; exit 1; }

# The CPU benchmark suite; figures go to docs/benchmarks.md. bench_convert needs ~45 GiB of free disk (a 15 GiB
# source .pt, the JAX checkpoint, then the exports) and takes 5-15 minutes; `make bench-quick` leaves it out.
bench: bench-quick
	$(PY) scripts/bench_convert.py

bench-quick: $(STAMP) espeak
	$(PY) scripts/bench_model.py
	$(PY) scripts/bench_data.py --utterances 60
	$(PY) scripts/bench_infer.py
	$(PY) scripts/bench_train.py --config configs/small.yaml --batch 4 --frames 1000

clean-venv:
	rm -rf $(VENV)
