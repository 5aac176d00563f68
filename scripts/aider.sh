#!/usr/bin/env bash
# Install Aider (PyPI aider-chat) used by the end-to-end tests and print its path as the last line.
#
# Aider pins exact versions of everything it uses (openai, litellm, numpy, tree-sitter, ...), so it
# gets a virtual environment of its own instead of sharing the project's. That environment lives
# in a cache outside the work tree, keyed by version, so only the first run downloads it (about
# 700 MB). A virtual environment cannot be moved once made, so it is made in place and a stamp
# written last says it is whole: an interrupted run is started over, never used half-installed.
set -euo pipefail

AIDER_VERSION="${AIDER_VERSION:-0.86.2}"
PYTHON="${PYTHON:-python3}"
cache="${LLAMABRIDGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llamabridge}"
prefix="$cache/aider-$AIDER_VERSION"

if [ ! -f "$prefix/.installed" ]; then
    # aider-chat 0.86 supports Python 3.10 to 3.12.
    if ! "$PYTHON" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 12))'; then
        echo "installing aider-chat needs Python 3.10 to 3.12 (PYTHON=$PYTHON is $("$PYTHON" --version 2>&1))" >&2
        exit 1
    fi
    echo "installing aider-chat==$AIDER_VERSION into $prefix (first run only)" >&2
    rm -rf "$prefix"
    mkdir -p "$cache"
    "$PYTHON" -m venv "$prefix"
    "$prefix/bin/python" -m pip install --quiet --disable-pip-version-check "aider-chat==$AIDER_VERSION" >&2
    touch "$prefix/.installed"
fi
echo "$prefix/bin/aider"
