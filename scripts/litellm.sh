#!/usr/bin/env bash
# Install LiteLLM's proxy (PyPI litellm[proxy]) used by the end-to-end tests as an
# OpenAI-compatible server that is not llama-server, and print its path as the last line.
#
# It pins its own versions of FastAPI, Pydantic, OpenAI and more, so it gets a virtual environment
# of its own, in the cache outside the work tree, keyed by version: only the first run downloads
# it (about 500 MB). A stamp written last says the environment is whole (see aider.sh).
set -euo pipefail

LITELLM_VERSION="${LITELLM_VERSION:-1.79.3}"
PYTHON="${PYTHON:-python3}"
cache="${LLAMABRIDGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llamabridge}"
prefix="$cache/litellm-$LITELLM_VERSION"

if [ ! -f "$prefix/.installed" ]; then
    echo "installing litellm[proxy]==$LITELLM_VERSION into $prefix (first run only)" >&2
    rm -rf "$prefix"
    mkdir -p "$cache"
    "$PYTHON" -m venv "$prefix"
    "$prefix/bin/python" -m pip install --quiet --disable-pip-version-check "litellm[proxy]==$LITELLM_VERSION" >&2
    touch "$prefix/.installed"
fi
echo "$prefix/bin/litellm"
