# Shoal: one command to set up, one to run, one to test.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast lint typecheck proto clean system-deps

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# Debian tools the network-namespace and dashboard tests need (installed only when missing, only as root).
system-deps:
	@if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	  missing=""; \
	  command -v ip >/dev/null || missing="$$missing iproute2"; \
	  command -v iptables >/dev/null || missing="$$missing iptables"; \
	  command -v chromium >/dev/null || missing="$$missing chromium"; \
	  if [ -n "$$missing" ]; then apt-get update -qq && apt-get install -y -qq $$missing; fi; \
	fi

demo: install
	$(VENV)/bin/shoal demo

test: install system-deps
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow and not netns"

# Lint and formatting are both checked; `ruff format src tests bench` fixes the latter.
lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

# The whole package, plus strict mode on net/ (the trust boundary: every wire type spelled out).
typecheck: install
	$(VENV)/bin/mypy src/shoal
	$(VENV)/bin/mypy --strict src/shoal/net

# Regenerate the committed gRPC code from proto/ (tests fail when it is stale).
proto: install
	$(PY) -m shoal.net.protogen

clean:
	rm -rf $(VENV) build dist .pytest_cache .mypy_cache .ruff_cache
