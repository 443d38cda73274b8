# streamgate: `make run` starts the gateway on the bundled default model; `make test` runs every
# test. Both do their own set-up (virtualenv, ONNX Runtime library, model conversion) and are
# idempotent: a second call does no network work.

SHELL := /bin/bash
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

CACHE    := .cache
VENV     := .venv
PY       := $(VENV)/bin/python
ORT_LIB  := $(CACHE)/onnxruntime/libonnxruntime.so.1.31.1
SMOLLM2  := $(CACHE)/models/smollm2-135m-instruct
# The same GGUF as an fp32 Optimum graph: the reference the fused default is measured against.
SMOLLM2_FP32 := $(CACHE)/models/smollm2-135m-instruct-fp32
GGUF     := $(CACHE)/downloads/SmolLM2-135M-Instruct.Q4_1.gguf
TINY     := models/tiny-llama
TINY_FUSED := models/tiny-llama-fused
PREP_PY  := $(addprefix scripts/model_prep/,gguf_to_onnx.py llama_onnx.py llama_fused.py hf_files.py)
CHROMIUM := /usr/bin/chromium
NGINX    := /usr/sbin/nginx
# The shared state backend's tests (two replicas, one Redis) start their own redis-server.
REDIS_SERVER := /usr/bin/redis-server
NODE_DEPS := tests/browser/node_modules/.package-lock.json
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

export ORT_DYLIB_PATH ?= $(abspath $(ORT_LIB))

.PHONY: bench bench-engine bench-micro bench-gateway
.PHONY: help setup venv ort model reference-model run test test-rust test-python test-browser browser-deps lint fmt clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: venv ort model ## virtualenv, ONNX Runtime library, default model (idempotent)

venv: $(VENV)/.installed
$(VENV)/.installed: scripts/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r scripts/requirements.txt
	touch $@

ort: $(ORT_LIB)
$(ORT_LIB): scripts/pins.env
	scripts/fetch_onnxruntime.sh

model: $(SMOLLM2)/model.onnx
$(SMOLLM2)/model.onnx: $(PREP_PY) scripts/prepare_smollm2.sh scripts/pins.env | $(VENV)/.installed
	scripts/prepare_smollm2.sh $(PY) $(SMOLLM2)

reference-model: $(SMOLLM2_FP32)/model.onnx ## the fp32 graph of the same GGUF (tests and benchmarks)
$(SMOLLM2_FP32)/model.onnx: $(PREP_PY) scripts/prepare_smollm2.sh scripts/pins.env | $(VENV)/.installed
	scripts/prepare_smollm2.sh $(PY) $(SMOLLM2_FP32) --layout optimum

run: setup ## start the gateway on the default model (http://127.0.0.1:8000)
	cargo run --release -p streamgate-gateway --bin streamgate -- --model v1=$(SMOLLM2)

test: setup lint test-rust test-python test-browser ## every test: Rust, Python references, browser and client libraries

lint: ## rustfmt, clippy (warnings are errors), and no import cycle between a crate's modules
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --quiet -- -D warnings
	python3 scripts/check_import_cycles.py crates/gateway/src
	python3 scripts/check_import_cycles.py crates/inference/src

test-rust: setup $(REDIS_SERVER)
	cargo build --quiet -p streamgate-inference --example reference_dump
	@if cargo nextest --version >/dev/null 2>&1; then \
	  cargo nextest run --workspace --no-fail-fast; \
	else cargo test --workspace --no-fail-fast; fi

test-python: setup reference-model $(NGINX) ## reference tests, the openai client, deploy/ (nginx, manifests, Dockerfile), bench smoke
	cargo build --quiet -p streamgate-inference --example reference_dump
	cargo build --quiet -p streamgate-gateway --bin streamgate -p streamgate-benches --bin streamgate-bench --bin actix-bare-sse --bin engine-bench
	$(PY) -m pytest tests/python -q

browser-deps: $(CHROMIUM) $(NODE_DEPS) ## Debian's Chromium and the test's npm packages
$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium
$(NGINX):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq nginx
$(REDIS_SERVER):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server
$(NODE_DEPS): tests/browser/package.json tests/browser/package-lock.json
	cd tests/browser && npm ci --no-audit --no-fund --loglevel=error

test-browser: setup browser-deps $(REDIS_SERVER)
	cargo build --quiet -p streamgate-gateway --bin streamgate
	cd tests/browser && node --test --test-concurrency=1

BENCH_PROMPT := <|im_start|>user\nCount from 1 to 300, separated by commas.<|im_end|>\n<|im_start|>assistant\n
BENCH_THREADS ?= $(shell nproc)

bench: bench-engine bench-micro bench-gateway ## every benchmark (results: docs/benchmarks.md)

$(VENV)/.bench-installed: benches/baselines/fastapi/requirements.txt | $(VENV)/.installed
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r benches/baselines/fastapi/requirements.txt
	touch $@

bench-gateway: setup $(VENV)/.bench-installed ## load tests: streamgate vs the FastAPI pattern (mock engine), SmolLM2, batching, resume on vs off
	cargo build --release --quiet -p streamgate-gateway --bin streamgate -p streamgate-benches --bin streamgate-bench --bin actix-bare-sse --bin batching-bench --bin engine-bench
	benches/run.sh all

bench-micro: ## criterion: rate-limit check with 1M clients, SSE event encoding, sampling a token; limiter memory
	cargo bench -p streamgate-gateway --bench hot_path -- --warm-up-time 1 --measurement-time 3

# llama.cpp, the peer users would pick instead: llama-cpp-python built from its PyPI sdist for this
# machine's CPU (about 5-15 minutes on 2 cores, once: the wheel is kept in .cache/wheels).
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
$(VENV)/.llama-cpp-installed: | $(VENV)/.installed
	mkdir -p $(CACHE)/wheels
	CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(VENV)/bin/pip wheel --quiet \
	  --disable-pip-version-check --no-deps --no-binary llama-cpp-python -w $(CACHE)/wheels $(LLAMA_CPP_PYTHON)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --find-links $(CACHE)/wheels $(LLAMA_CPP_PYTHON)
	touch $@

bench-engine: setup reference-model $(VENV)/.llama-cpp-installed ## one stream: the fused engine (both attention kernels), the fp32 graph and llama.cpp on the same GGUF
	cargo build --release --quiet -p streamgate-benches --bin engine-bench
	@mkdir -p target/bench
	@prompt=$$(printf '$(BENCH_PROMPT)'); : > target/bench/engine.jsonl; \
	long="--long-prompt-file tests/data/quality_text.txt --tokens 128 --runs 2 --threads $(BENCH_THREADS)"; \
	for round in 1 2 3; do \
	  for model in $(SMOLLM2) $(SMOLLM2_FP32); do \
	    target/release/engine-bench --model $$model --ort $(ORT_LIB) --prompt "$$prompt" $$long >> target/bench/engine.jsonl; \
	  done; \
	  target/release/engine-bench --model $(SMOLLM2) --ort $(ORT_LIB) --prompt "$$prompt" $$long --ort-attention \
	    >> target/bench/engine.jsonl; \
	  target/release/engine-bench --model $(SMOLLM2) --ort $(ORT_LIB) --prompt "$$prompt" $$long --slots 8 --batch-invariant \
	    >> target/bench/engine.jsonl; \
	  $(PY) benches/python/llama_cpp_bench.py --gguf $(GGUF) --prompt "$$prompt" $$long >> target/bench/engine.jsonl \
	    || echo "{\"impl\": \"llama.cpp\", \"model\": \"$(GGUF)\", \"error\": \"exit status $$?\"}" >> target/bench/engine.jsonl; \
	done
	$(PY) benches/python/engine_table.py < target/bench/engine.jsonl

tiny-model: venv ## regenerate the committed tiny test model (deterministic)
	$(PY) scripts/model_prep/make_tiny_model.py $(TINY) --fused $(TINY_FUSED) --no-past-fixture models/fixtures/no-past \
	  --attention-fixture models/fixtures/attention

fmt: ## format the Rust code
	cargo fmt --all

clean: ## remove build outputs and caches (models, venv, library)
	rm -rf target $(CACHE) $(VENV)
