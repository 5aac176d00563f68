#!/usr/bin/env bash
# Install the Claude Code CLI used by the end-to-end tests and print the binary's path as the last line.
#
# Installed from npm into a cache outside the work tree, keyed by version, so only the first run
# downloads it. npm 11 does not run the wrapper package's postinstall, so we return the native
# binary from the platform package directly.
set -euo pipefail
source "$(dirname "$0")/npm-tool.sh"

CLAUDE_CODE_VERSION="${CLAUDE_CODE_VERSION:-2.1.332}"
arch=$(npm_arch)
npm_tool @anthropic-ai/claude-code "$CLAUDE_CODE_VERSION" claude-code \
    "node_modules/@anthropic-ai/claude-code-linux-$arch/claude" \
    node_modules/@anthropic-ai/claude-code/bin/claude \
    node_modules/.bin/claude
