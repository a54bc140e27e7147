# rmlx: every set-up step lives here. `make serve` and `make test` work on a
# fresh Debian machine with Rust and Python 3.
CARGO ?= cargo
TEST_PLUGINS := --exclude rmlx-test-probe --exclude rmlx-test-faulty --exclude rmlx-test-old-abi

FIXTURES := $(patsubst %.gz,%,$(wildcard tests/fixtures/*/*/*.json.gz))

.PHONY: all fixtures mlx build release test serve dev-venv default-model goldens openapi clean

all: release

## MLX for Linux (mlx-cpu wheel) + shared libmlxc, under .mlx/ (idempotent)
mlx:
	@bash scripts/install-mlx.sh

## unpack the gzipped test fixtures (large tokenizer.json files)
fixtures: $(FIXTURES)
%.json: %.json.gz
	gzip -dkf $<

## debug build of everything, plugins staged in target/debug/plugins
build: mlx fixtures
	$(CARGO) build --workspace
	@bash scripts/stage-plugins.sh debug
	@bash scripts/build-prev-abi.sh debug

## release build of the binary and the shipped plugins (target/release/plugins)
release: mlx
	$(CARGO) build --release --workspace $(TEST_PLUGINS)
	@bash scripts/stage-plugins.sh release

## Python dev environment for goldens and API tests, and the TypeScript client test's npm packages (tests only)
dev-venv:
	@bash scripts/dev-venv.sh
	@cd tests/api/ts && npm ci --no-audit --no-fund --loglevel=error

## the default model (SmolLM2-135M-Instruct), converted once into ~/.cache/rmlx
default-model: build
	@bash scripts/default-model.sh target/debug/rmlx >/dev/null

## run every test
test: build dev-venv default-model
	@bash scripts/run-tests.sh

## serve the default model on http://127.0.0.1:8080
serve: release
	target/release/rmlx serve --model "$$(bash scripts/default-model.sh target/release/rmlx)"

## regenerate the mlx-lm golden fixtures (dev only)
goldens: dev-venv
	.venv-dev/bin/python tests/goldens/make_goldens.py
	.venv-dev/bin/python tests/goldens/make_wquant_model_goldens.py

## regenerate schemas/openapi.json from the code (a test fails when it drifts)
openapi: build
	target/debug/rmlx openapi > schemas/openapi.json

clean:
	$(CARGO) clean
