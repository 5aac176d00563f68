#!/usr/bin/env bash
# Install Cline's command-line agent (npm cline, which speaks the OpenAI Chat Completions API to a
# local server as its "openai" / openai-compatible provider) used by the end-to-end tests and print
# its path as the last line.
#
# Installed from npm into a cache outside the work tree, keyed by version, so only the first run
# downloads it (about 420 MB, of which 150 MB is the Bun-compiled binary). We return that binary
# from the platform package directly rather than npm's Node wrapper: the wrapper runs it as a
# child, so a signal sent to the wrapper's PID kills only the wrapper and leaves the agent running.
set -euo pipefail
source "$(dirname "$0")/npm-tool.sh"

CLINE_VERSION="${CLINE_VERSION:-3.0.65}"
arch=$(npm_arch)
npm_tool cline "$CLINE_VERSION" cline \
    "node_modules/@cline/cli-linux-$arch/bin/cline" \
    node_modules/.bin/cline
