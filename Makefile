# Two commands for a newcomer (see README):
#   make results   set up .venv from environment.yml, then run every notebook on synthetic data
#   make test      set up .venv, then run the test suite
# Everything else is a building block of those two.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.lmlib-installed
KERNEL := lmlib
# Forwarded to the driver: `make results RUN_ARGS="--dataset hamedan-ceph --data-dir ../shared/data/hamedan-ceph"`
RUN_ARGS ?=
TEST_ARGS ?=
# the suite on one pytest-xdist worker per core; tests/conftest.py runs each module (and each synthetic pipeline)
# on one worker, the longest first, and shares the cores between the workers. PARALLEL= runs it in one process.
PARALLEL ?= -n auto

.PHONY: setup results paper peer-env test test-fast lab clean-venv

setup: $(STAMP)

$(STAMP): environment.yml pyproject.toml scripts/env_pip_args.py
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade "pip>=24"
	$(VPY) -m pip install --quiet $$($(PYTHON) scripts/env_pip_args.py environment.yml)
	$(VPY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (lmlib)" >/dev/null
	@# nbstripout writes its filter into .git/info/attributes, which outranks .gitattributes: repeat
	@# the results/ exemption after it so executed notebooks keep their outputs.
	@if git rev-parse --git-dir >/dev/null 2>&1; then \
	  $(VENV)/bin/nbstripout --install && \
	  echo 'results/**/*.ipynb -filter -diff' >> "$$(git rev-parse --git-path info/attributes)"; fi
	@touch $(STAMP)

results: $(STAMP)
	$(VPY) -m lmlib.run $(RUN_ARGS)

# the comparison paper: every method's full setting and the comparisons on the real data
paper: $(STAMP)
	$(VPY) -m lmlib.run --dataset hamedan-ceph hand-xray afids-mni afids-templates --profile full $(RUN_ARGS)

# the peer toolkit of the benchmark notebook (95), apart from ours: CPU torch first so that pip keeps it, then
# landmarker with the torchvision release made for that torch (scripts/peer_landmarker.py explains its import)
PEER_VENV ?= .venv-peer
peer-env:
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install --quiet torch==2.13.0
	$(PEER_VENV)/bin/pip install --quiet torch==2.13.0 torchvision==0.28.0 landmarker==0.4.1

test: $(STAMP)
	$(VPY) -m pytest $(PARALLEL) $(TEST_ARGS)

# the fast tier: everything but the tests marked slow (training, notebooks, the docs build)
test-fast: $(STAMP)
	$(VPY) -m pytest -m "not slow" $(PARALLEL) $(TEST_ARGS)

lab: $(STAMP)
	env MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483648 $(VENV)/bin/jupyter lab notebooks/

clean-venv:
	rm -rf $(VENV)
