# Two commands for a newcomer: `make demo` and `make test`. Both create .venv when missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench foundations device-env test-device-env slurm-local slurm-local-stop clean

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

# The GPU machine's Python environment, on the CPU (DEVELOPERS.md, "The GPU machine"): a stand-in
# of its image (Python 3.12, torch 2.11, ...; nothing the image lacks), the wheels a device call
# carries there (.whl/), and in $(DEVICE_SITE) those wheels and what else the image lacks.
PYTHON312 ?= python3.12
DEVICE_VENV ?= .venv-device
DEVICE_PY := $(DEVICE_VENV)/bin/python
DEVICE_SITE := $(DEVICE_VENV)/site
DEVICE_OUT ?= runs/device-cpu

$(DEVICE_VENV)/.installed: bench/device/image.txt bench/device/image-packages.txt
	test -x $(DEVICE_PY) || $(PYTHON312) -m venv $(DEVICE_VENV)
	$(DEVICE_PY) -m pip install -q --upgrade pip
	$(DEVICE_PY) -m pip install -q -r bench/device/image.txt
	env -u PYTHONPATH $(DEVICE_PY) bench/device/check.py --stand-in
	touch $@

.whl/.complete: bench/device/wheels.txt
	bash bench/device/wheels.sh

$(DEVICE_SITE)/.installed: $(DEVICE_VENV)/.installed .whl/.complete bench/device/not-carried.txt
	rm -rf $(DEVICE_SITE)
	$(DEVICE_PY) -m pip install -q --no-deps --target $(DEVICE_SITE) .whl/*.whl -r bench/device/not-carried.txt
	touch $@

device-env: $(DEVICE_SITE)/.installed

# The device call's own script on the CPU (fresh wheels, no registry), then the suite with
# everything the image lacks.
test-device-env: device-env
	env -u PYTHONPATH PYTHON=$(DEVICE_PY) bash bench/device/run.sh --device cpu $(DEVICE_OUT)
	PYTHONPATH=$(abspath $(DEVICE_SITE)):$(CURDIR) $(DEVICE_PY) bench/device/check.py
	PYTHONPATH=$(abspath $(DEVICE_SITE)):$(CURDIR) $(DEVICE_PY) -m pytest -q -ra -p no:cacheprovider tests

# A two-node SLURM cluster on this machine (root; apt installs slurm-wlm and munge). See DEVELOPERS.md.
slurm-local:
	bash slurm/local/up.sh

slurm-local-stop:
	bash slurm/local/down.sh

clean:
	rm -rf $(VENV) $(DEVICE_VENV) .whl demo_out .pytest_cache
