# `make test` and `make demo` build their own virtual environment in .venv.
# torch is installed first and pinned here only: pyproject keeps an honest range
# (torch>=2.4) for GPU users; an unpinned torch would pull the CUDA wheels.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint format demo bench-gpu clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# pytest exits 5 when it collected no tests: a suite that tests nothing fails, and says so.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "tests failed: pytest collected no tests"; fi; exit $$rc

# The unit tier (tests/conftest.py: every test has one): in-process, under 2 minutes on 2 cores.
test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m unit

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: $(STAMP)
	$(PY) tools/demo.py

# The GPU targets of the throughput work: ALBERT-xlarge at T 512 and llama-small, bf16, ours
# against HF at the largest micro-batch that fits both, then ours compiled.
BENCH := $(PY) tools/bench_train.py --device cuda --precision bf16 --steps 20 --fit-batch
bench-gpu: $(STAMP)
	$(BENCH) albert-xlarge --engine.micro_batch_size=64
	$(BENCH) llama-small --engine.micro_batch_size=32
	$(BENCH) albert-xlarge --engine.micro_batch_size=64 --train.compile=true --no-reference
	$(BENCH) llama-small --engine.micro_batch_size=32 --train.compile=true --no-reference

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
