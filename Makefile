# Two entry points for a fresh machine: `make demo` (the main job, end to end, on the embedded default model)
# and `make test`. Both create the virtualenv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint protos

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,ui]'
	touch $@

demo: $(VENV)/.installed
	$(PY) scripts/demo.py

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

protos: $(VENV)/.installed
	cd protos && ../$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. tuneavideo/v1/*.proto
