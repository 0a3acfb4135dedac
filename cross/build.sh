#!/usr/bin/env bash
# Builds tandemd for Jetson Orin: aarch64, `--features gpu` (CUDA and TensorRT execution providers;
# ONNX Runtime itself is loaded at run time, so no NVIDIA library is needed here), linked by zig
# against glibc 2.31 (JetPack 5) and 2.35 (JetPack 6), then checks each binary's glibc floor.
#
#   cross/build.sh [jp5|jp6]...     (default: both)
#
# Binaries: target/cross/<jp>/aarch64-unknown-linux-gnu/release/tandemd
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=cross/toolchain.sh
. cross/toolchain.sh
ensure_toolchain

jetpacks=("$@")
[ ${#jetpacks[@]} -gt 0 ] || jetpacks=(jp5 jp6)
for jp in "${jetpacks[@]}"; do
    glibc=$(glibc_of "$jp")
    echo "cross: building tandemd for $jp ($TARGET, glibc $glibc)"
    CARGO_TARGET_DIR=$(target_dir_of "$jp") cargo zigbuild --release --locked -p tandemd --features gpu \
        --target "$TARGET.$glibc"
    cross/check-glibc.sh "$(binary_of "$jp")" "$glibc"
done
