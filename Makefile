# Two entry points, both self-contained on a fresh machine:
#   make demo   -- real heatmap query (efficientnet-lite0, real ImageNet weights, bundled photo)
#   make test   -- the test suite
# Each creates (or reuses) .venv and installs the project into it in editable mode.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kql-installed

.PHONY: demo test venv clean bench bench-batch docs

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	mkdir -p out
	$(VENV)/bin/kql -c "EXPLAIN SELECT HEATMAP FROM coffee USING efficientnet_lite0 PATCH 16 STRIDE 8; \
	SELECT HEATMAP FROM coffee USING efficientnet_lite0 PATCH 16 STRIDE 8 INTO 'out/coffee_heatmap.png';"

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

# Fashion-MNIST, for the CNN the tests train (kql/zoo.py): Debian's dataset-fashion-mnist puts it
# here. A file target, so nothing runs once it exists; apt-get update only if the install fails.
FASHION_MNIST         := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
FASHION_MNIST_INSTALL := apt-get install -y --no-install-recommends -o DPkg::Lock::Timeout=300 dataset-fashion-mnist
test: $(FASHION_MNIST)
$(FASHION_MNIST):
	$(FASHION_MNIST_INSTALL) || { apt-get update && $(FASHION_MNIST_INSTALL); }
	test -f $@

bench: $(STAMP)
	$(PY) benchmarks/occlusion_bench.py

bench-batch: $(STAMP)
	$(PY) benchmarks/batch_bench.py

docs: $(STAMP)
	$(PY) scripts/plot_speedup.py

clean:
	rm -rf $(VENV) out build *.egg-info
