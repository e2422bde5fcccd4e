# Two commands on a fresh machine: `make demo` (the main job on the bundled default) and `make test`.
# Both create .venv and install what they need; the Fashion-MNIST files come from Debian's dataset-fashion-mnist.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test data clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

data:
	@if [ ! -f $(FMNIST) ]; then \
	  if command -v apt-get >/dev/null; then \
	    $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist; \
	  else echo "Fashion-MNIST is not installed and apt-get is missing: pass --data-root DIR to download it"; fi; \
	fi

demo: $(STAMP) data
	$(PY) benchmarks/demo.py --out runs/demo --overwrite

test: $(STAMP) data
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
