#!/usr/bin/env bash
# Install Continue's command-line agent (npm @continuedev/cli, the `cn` command, which reads the
# same ~/.continue/config.yaml as Continue's IDE extensions) used by the end-to-end tests and
# print its path as the last line.
#
# Installed from npm into a cache outside the work tree, keyed by version, so only the first run
# downloads it (about 80 MB).
set -euo pipefail
source "$(dirname "$0")/npm-tool.sh"

CONTINUE_VERSION="${CONTINUE_VERSION:-1.5.47}"
npm_tool @continuedev/cli "$CONTINUE_VERSION" continue-cli node_modules/.bin/cn
