#!/usr/bin/env bash
# Runs the aarch64 builds of the unit tests that do not load ONNX Runtime (tandem-core, and tandemd's
# library and binary unit tests with `--features gpu`) under qemu-user, linked for glibc 2.31.
# ONNX Runtime itself cannot run under qemu-user (its cpuinfo reads the host's x86 /proc/cpuinfo
# and crashes in dlopen), so the engine is tested natively on x86_64 and on the device.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=cross/toolchain.sh
. cross/toolchain.sh
ensure_toolchain
command -v qemu-aarch64 >/dev/null ||
    fail "qemu-aarch64 is missing: apt-get install -y qemu-user libc6-arm64-cross libgcc-s1-arm64-cross"
if [ ! -e "$AARCH64_SYSROOT/lib/ld-linux-aarch64.so.1" ] || [ ! -e "$AARCH64_SYSROOT/lib/libgcc_s.so.1" ]; then
    fail "no arm64 C runtime in $AARCH64_SYSROOT: apt-get install -y libc6-arm64-cross libgcc-s1-arm64-cross"
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L $AARCH64_SYSROOT"
glibc=$(glibc_of jp5)
# `cargo-zigbuild test` (with a hyphen): `cargo zigbuild test` is not a subcommand.
CARGO_TARGET_DIR=$(target_dir_of jp5) cargo-zigbuild test --locked --target "$TARGET.$glibc" \
    -p tandem-core
CARGO_TARGET_DIR=$(target_dir_of jp5) cargo-zigbuild test --locked --target "$TARGET.$glibc" \
    -p tandemd --features gpu --lib --bins
