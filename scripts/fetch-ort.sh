#!/bin/sh
# Fetches libonnxruntime.so (CPU execution provider) from the `onnxruntime` wheel on PyPI into DEST.
# Idempotent: does nothing when DEST already holds the requested version. Needs python3 with pip.
# Usage: ORT_VERSION=1.31.1 scripts/fetch-ort.sh .ort
set -eu
VERSION=${ORT_VERSION:?set ORT_VERSION (the Makefile pins it)}
ARCH=${ORT_ARCH:-$(uname -m)}
DEST=${1:-.ort}

if [ -e "$DEST/libonnxruntime.so.$VERSION" ] && [ -L "$DEST/libonnxruntime.so" ]; then
    exit 0
fi
case "$ARCH" in
    x86_64|aarch64) ;;
    *) echo "fetch-ort: no onnxruntime wheel for $ARCH (x86_64 and aarch64 only)" >&2; exit 1 ;;
esac
if ! python3 -m pip --version >/dev/null 2>&1; then
    echo "fetch-ort: python3 with pip is needed (apt-get install python3-pip)" >&2
    exit 1
fi
mkdir -p "$DEST/wheel"
echo "fetch-ort: downloading onnxruntime $VERSION ($ARCH) from PyPI"
python3 -m pip download --quiet --no-deps --only-binary=:all: --platform "manylinux_2_28_$ARCH" \
    --python-version 3.11 -d "$DEST/wheel" "onnxruntime==$VERSION"
python3 - "$DEST" "$VERSION" <<'PY'
import glob, os, sys, zipfile
dest, version = sys.argv[1], sys.argv[2]
wheel = sorted(glob.glob(f"{dest}/wheel/onnxruntime-{version}-*.whl"))[-1]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if name.startswith("onnxruntime/capi/libonnxruntime") and ".so" in base:
            tmp = f"{dest}/{base}.partial"
            with open(tmp, "wb") as f:
                f.write(z.read(name))
            os.chmod(tmp, 0o755)
            os.replace(tmp, f"{dest}/{base}")
lib = f"{dest}/libonnxruntime.so.{version}"
if not os.path.exists(lib):
    sys.exit(f"fetch-ort: {wheel} holds no libonnxruntime.so.{version}")
for link in ("libonnxruntime.so.1", "libonnxruntime.so"):
    path = f"{dest}/{link}"
    if os.path.lexists(path):
        os.remove(path)
    os.symlink(os.path.basename(lib), path)
print(f"fetch-ort: {os.path.abspath(lib)}")
PY
rm -rf "$DEST/wheel"
