# Two commands for a newcomer: `make demo` and `make test`. Both create .venv when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench foundations slurm-local slurm-local-stop clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m lit_restore.demo

# The tiny VAE, CLIP, UNet, LDM, restorer and SCM that configs/tiny/ and the demo start from
# (shipped in foundations/tiny/; this is how they were made: about 3 h on a 2-core machine, see
# the cards in foundations/tiny/).
foundations: $(STAMP)
	$(PY) -m lit_restore.foundations

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

bench: $(STAMP)
	$(PY) bench/loader.py
	$(PY) bench/degrade.py

# A two-node SLURM cluster on this machine (root; apt installs slurm-wlm and munge). See DEVELOPERS.md.
slurm-local:
	bash slurm/local/up.sh

slurm-local-stop:
	bash slurm/local/down.sh

clean:
	rm -rf $(VENV) demo_out .pytest_cache
