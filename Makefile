# Tandem: `make demo` runs the main job, `make test` runs every test. Both work on a fresh machine.

# ONNX Runtime, fetched from the `onnxruntime` wheel on PyPI (the only place it is pinned).
ORT_VERSION := 1.31.1
ORT_DIR := $(CURDIR)/.ort
ORT_LIB := $(ORT_DIR)/libonnxruntime.so.$(ORT_VERSION)
export ORT_DYLIB_PATH := $(ORT_DIR)/libonnxruntime.so
export ORT_VERSION

CARGO ?= cargo

.PHONY: all ort build test demo bench clean-ort

all: build

ort: $(ORT_LIB)

$(ORT_LIB): scripts/fetch-ort.sh
	ORT_VERSION=$(ORT_VERSION) scripts/fetch-ort.sh $(ORT_DIR)

build:
	$(CARGO) build --workspace --bins

# The e2e tests run the real binaries, so they are built first; the GPU build is type-checked so it
# cannot rot on machines without a GPU.
test: ort
	scripts/test-deps.sh
	$(CARGO) build --workspace --bins
	$(CARGO) check -p tandemd --features gpu
	$(CARGO) test --workspace --no-fail-fast

demo: ort build
	scripts/demo.sh

bench: ort
	scripts/bench.sh

clean-ort:
	rm -rf $(ORT_DIR)
