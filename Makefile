# Tandem: `make demo` runs the main job, `make test` runs every test. Both work on a fresh machine.

# ONNX Runtime, fetched from the `onnxruntime` wheel on PyPI (the only place it is pinned).
ORT_VERSION := 1.31.1
ORT_DIR := $(CURDIR)/.ort
ORT_LIB := $(ORT_DIR)/libonnxruntime.so.$(ORT_VERSION)
export ORT_DYLIB_PATH := $(ORT_DIR)/libonnxruntime.so
export ORT_VERSION

CARGO ?= cargo

.PHONY: all ort build test demo bench models clean-ort cross package

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

# The demo's signed Countdown policies under models/, trained by our own trainer (about an hour).
models:
	scripts/models.sh

clean-ort:
	rm -rf $(ORT_DIR)

# Jetson builds (see cross/README.md): aarch64 tandemd with the GPU providers for JetPack 5 (glibc
# 2.31) and 6 (glibc 2.35), each binary's glibc floor checked, then the unit tests that do not load
# ONNX Runtime run under qemu-user. Minutes to tens of minutes; not part of `make test`.
cross:
	cross/build.sh
	cross/test-qemu.sh

# One device .deb per JetPack from the cross builds: target/debian/tandemd_*_arm64.deb.
package:
	cross/build.sh
	cross/package.sh
