#!/usr/bin/env bash
# Fails unless BINARY is an aarch64 executable that needs glibc MAX_GLIBC or older and links only
# the C runtime (no ONNX Runtime, CUDA or TensorRT at link time: those are loaded at run time).
#
#   cross/check-glibc.sh BINARY MAX_GLIBC
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 BINARY MAX_GLIBC" >&2; exit 2; }
binary=$1
max=$2
command -v readelf >/dev/null || { echo "check-glibc: readelf is missing: apt-get install -y binutils" >&2; exit 1; }
[ -f "$binary" ] || { echo "check-glibc: $binary does not exist; run cross/build.sh" >&2; exit 1; }

machine=$(readelf -h "$binary" | sed -n 's/^ *Machine: *//p')
if [ "$machine" != "AArch64" ]; then
    echo "check-glibc: $binary is built for '$machine', not AArch64" >&2
    exit 1
fi

# Every GLIBC_x.y the binary asks for (its version-needs section).
highest=$(readelf -V -W "$binary" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/^GLIBC_//' | sort -u -V | tail -1)
[ -n "$highest" ] || { echo "check-glibc: $binary asks for no GLIBC_ version; is it dynamically linked?" >&2; exit 1; }
if [ "$(printf '%s\n%s\n' "$highest" "$max" | sort -V | tail -1)" != "$max" ]; then
    echo "check-glibc: $binary needs GLIBC_$highest but the target has glibc $max; symbols above it:" >&2
    readelf --dyn-syms -W "$binary" | grep -o '[^ ]*@GLIBC_[0-9.]*' | while read -r sym; do
        version=${sym##*@GLIBC_}
        if [ "$(printf '%s\n%s\n' "$version" "$max" | sort -V | tail -1)" != "$max" ]; then
            echo "  $sym" >&2
        fi
    done
    exit 1
fi

allowed=" libc.so.6 libm.so.6 libpthread.so.0 libdl.so.2 librt.so.1 libgcc_s.so.1 ld-linux-aarch64.so.1 "
needed=$(readelf -d "$binary" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')
for lib in $needed; do
    case "$allowed" in
    *" $lib "*) ;;
    *)
        echo "check-glibc: $binary links $lib; only the C runtime may be linked (ONNX Runtime is loaded at run time)" >&2
        exit 1
        ;;
    esac
done
echo "check-glibc: $binary: AArch64, highest GLIBC_$highest (limit $max), needs ${needed% }"
