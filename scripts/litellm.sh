#!/usr/bin/env bash
# Install LiteLLM's proxy (PyPI litellm[proxy]) used by the end-to-end tests as an
# OpenAI-compatible server that is not llama-server, and print its path as the last line.
#
# It pins its own versions of FastAPI, Pydantic, OpenAI and more, so it gets a virtual environment
# of its own, in the cache outside the work tree, keyed by version: only the first run downloads
# it (about 500 MB; scripts/pip-tool.sh).
set -euo pipefail
. "$(dirname "$0")/pip-tool.sh"

LITELLM_VERSION="${LITELLM_VERSION:-1.79.3}"
pip_tool litellm "$LITELLM_VERSION" "litellm[proxy]==$LITELLM_VERSION" litellm
