# Two entry points, both self-contained on a fresh machine:
#   make demo   -- real heatmap query (efficientnet-lite0, real ImageNet weights, bundled photo)
#   make test   -- the test suite (installs Debian's chromium for the browser test)
#   make test-fast -- the suite without the tests marked slow, for local work
#   make serve  -- the web page on http://127.0.0.1:8000/
# Each creates (or reuses) .venv and installs the project into it in editable mode.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kql-installed
# The browser test (tests/test_web_browser.py) drives Debian's Chromium through
# Playwright; Playwright never downloads a browser of its own here.
CHROMIUM := /usr/bin/chromium
SUDO     := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: demo test test-fast venv clean bench bench-batch docs serve

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
		chromium chromium-driver

venv: $(STAMP)

demo: $(STAMP)
	mkdir -p out
	$(VENV)/bin/kql -c "EXPLAIN SELECT HEATMAP FROM coffee USING efficientnet_lite0 PATCH 16 STRIDE 8; \
	SELECT HEATMAP FROM coffee USING efficientnet_lite0 PATCH 16 STRIDE 8 INTO 'out/coffee_heatmap.png';"

test: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest -q -n 2 tests

# Local work: everything but the tests marked slow (pyproject.toml lists the marker).
test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 -m "not slow" tests

# Fashion-MNIST, for the CNN the tests train (kql/zoo.py): Debian's dataset-fashion-mnist puts it
# here. A file target, so nothing runs once it exists; apt-get update only if the install fails.
FASHION_MNIST         := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
FASHION_MNIST_INSTALL := $(SUDO) apt-get install -y --no-install-recommends -o DPkg::Lock::Timeout=300 dataset-fashion-mnist
test: $(FASHION_MNIST)
$(FASHION_MNIST):
	$(FASHION_MNIST_INSTALL) || { $(SUDO) apt-get update && $(FASHION_MNIST_INSTALL); }
	test -f $@

serve: $(STAMP)
	$(VENV)/bin/kql serve

bench: $(STAMP)
	$(PY) benchmarks/occlusion_bench.py

bench-batch: $(STAMP)
	$(PY) benchmarks/batch_bench.py

docs: $(STAMP)
	$(PY) scripts/plot_speedup.py

clean:
	rm -rf $(VENV) out build *.egg-info
