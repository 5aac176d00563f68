#!/usr/bin/env bash
# Install OpenCode (npm opencode-ai, a terminal coding agent that speaks the OpenAI Chat Completions
# API to a local server) used by the end-to-end tests and print its path as the last line.
#
# Installed from npm into a cache outside the work tree, keyed by version, so only the first run
# downloads it (about 370 MB: npm fetches both of its Linux x64 builds). The path is npm's
# launcher, which starts the platform package's native binary.
set -euo pipefail
source "$(dirname "$0")/npm-tool.sh"

OPENCODE_VERSION="${OPENCODE_VERSION:-1.18.33}"
npm_tool opencode-ai "$OPENCODE_VERSION" opencode node_modules/.bin/opencode
