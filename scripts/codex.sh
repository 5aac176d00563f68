#!/usr/bin/env bash
# Install the Codex CLI (OpenAI's coding agent, which speaks only the Responses API) used by the
# end-to-end tests and print its path as the last line.
#
# Installed from npm into a cache outside the work tree, keyed by version, so only the first run
# downloads it (about 400 MB with its platform package). The path is npm's launcher, which
# starts the platform package's native binary with Node.
set -euo pipefail
source "$(dirname "$0")/npm-tool.sh"

CODEX_VERSION="${CODEX_VERSION:-0.171.0}"
npm_tool @openai/codex "$CODEX_VERSION" codex node_modules/.bin/codex
