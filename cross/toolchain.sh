# shellcheck shell=bash
# shellcheck disable=SC2034 # the variables are used by the scripts that source this file
# Sourced by the cross/ scripts: the aarch64 toolchain, installed from registries only.
# - Rust std for aarch64 from rustup (static.rust-lang.org);
# - zig from PyPI (`ziglang`), in a venv under target/ (cargo-zigbuild runs `python3 -m ziglang`);
# - cargo-zigbuild from crates.io.
# zig links against the glibc version named in the target triple, which is how one x86_64 host builds
# binaries that start on JetPack 5 (glibc 2.31) and JetPack 6 (glibc 2.35).

TARGET=aarch64-unknown-linux-gnu
ZIGLANG_VERSION=0.17.0
CARGO_ZIGBUILD_VERSION=0.24.1
ZIG_VENV=target/cross/zig-venv
# JetPack release, its glibc (Ubuntu 20.04 and 22.04) and Debian package revision suffix.
JETPACKS="jp5:2.31 jp6:2.35"
# Unpacked arm64 glibc for qemu-user (`-L`): Debian's libc6-arm64-cross.
AARCH64_SYSROOT=/usr/aarch64-linux-gnu

fail() {
    echo "cross: $*" >&2
    exit 1
}

glibc_of() {
    local entry
    for entry in $JETPACKS; do
        if [ "${entry%%:*}" = "$1" ]; then
            echo "${entry#*:}"
            return
        fi
    done
    fail "unknown JetPack '$1' (known: $JETPACKS)"
}

# target/cross/<jp>: each glibc floor gets its own target directory, since C code (ring) is compiled
# against that glibc's headers too.
target_dir_of() {
    echo "target/cross/$1"
}

binary_of() {
    echo "$(target_dir_of "$1")/$TARGET/release/tandemd"
}

ensure_toolchain() {
    if ! rustup target list --installed | grep -qx "$TARGET"; then
        echo "cross: installing the Rust standard library for $TARGET (rustup)"
        rustup target add "$TARGET" ||
            fail "rustup could not download the $TARGET standard library (static.rust-lang.org); zig does not replace it"
    fi
    if ! "$ZIG_VENV/bin/python3" -c "import ziglang" 2>/dev/null; then
        echo "cross: installing zig $ZIGLANG_VERSION into $ZIG_VENV (pip)"
        python3 -m venv "$ZIG_VENV"
        "$ZIG_VENV/bin/pip" install --quiet "ziglang==$ZIGLANG_VERSION"
    fi
    PATH="$PWD/$ZIG_VENV/bin:$PATH"
    export PATH
    if ! command -v cargo-zigbuild >/dev/null; then
        echo "cross: installing cargo-zigbuild $CARGO_ZIGBUILD_VERSION (crates.io)"
        cargo install --locked cargo-zigbuild --version "$CARGO_ZIGBUILD_VERSION"
    fi
}
