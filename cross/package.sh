#!/usr/bin/env bash
# Builds the device packages from cross/build.sh's binaries, one per JetPack glibc floor:
#   target/debian/tandemd_<version>-1+jp5_arm64.deb   (glibc >= 2.31: JetPack 5 and 6)
#   target/debian/tandemd_<version>-1+jp6_arm64.deb   (glibc >= 2.35: JetPack 6)
# Contents: /usr/bin/tandemd, /lib/systemd/system/tandemd.service, /etc/tandem/tandemd.toml
# (conffile, configs/tandemd-jetson-orin.toml), /usr/lib/tandemd/find-onnxruntime, the deployment guide, and
# the maintainer scripts in cross/debian/.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=cross/toolchain.sh
. cross/toolchain.sh
CARGO_DEB_VERSION=3.8.0
if ! command -v cargo-deb >/dev/null; then
    echo "cross: installing cargo-deb $CARGO_DEB_VERSION (crates.io)"
    cargo install --locked cargo-deb --version "$CARGO_DEB_VERSION"
fi

mkdir -p target/debian
for jp in jp5 jp6; do
    binary=$(binary_of "$jp")
    [ -x "$binary" ] || fail "$binary is missing: run cross/build.sh (or make cross) first"
    cross/check-glibc.sh "$binary" "$(glibc_of "$jp")"
    # The host's strip does not know aarch64; the release profile carries no debug info anyway.
    deb=$(CARGO_TARGET_DIR=$(target_dir_of "$jp") cargo deb -p tandemd --no-build --no-strip \
        --target "$TARGET" --variant "$jp" --deb-revision "1+$jp" --output target/debian/ | tail -n 1)
    echo "cross: $deb"
    dpkg-deb --field "$deb" Package Version Architecture Depends
    dpkg-deb --contents "$deb" | awk '{ print "  " $1 " " $3 " " $6 }'
done
