#!/usr/bin/env bash
# Install Aider (PyPI aider-chat) used by the end-to-end tests and print its path as the last line.
#
# Aider pins exact versions of everything it uses (openai, litellm, numpy, tree-sitter, ...), so it
# gets a virtual environment of its own instead of sharing the project's. That environment lives
# in a cache outside the work tree, keyed by version, so only the first run downloads it (about
# 700 MB; scripts/pip-tool.sh).
set -euo pipefail
. "$(dirname "$0")/pip-tool.sh"

AIDER_VERSION="${AIDER_VERSION:-0.86.2}"

if [ ! -f "$(pip_tool_prefix aider "$AIDER_VERSION")/.installed" ]; then
    # aider-chat 0.86 supports Python 3.10 to 3.12.
    if ! "$PYTHON" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 12))'; then
        echo "installing aider-chat needs Python 3.10 to 3.12 (PYTHON=$PYTHON is $("$PYTHON" --version 2>&1))" >&2
        exit 1
    fi
fi
pip_tool aider "$AIDER_VERSION" "aider-chat==$AIDER_VERSION" aider
