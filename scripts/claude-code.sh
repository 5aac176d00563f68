#!/usr/bin/env bash
# Install the Claude Code CLI used by the end-to-end tests and print the binary's path as the last line.
#
# Installed from npm into a cache outside the work tree, keyed by version, so only the first run
# downloads it. npm 11 does not run the wrapper package's postinstall, so we return the native
# binary from the platform package directly.
set -euo pipefail

CLAUDE_CODE_VERSION="${CLAUDE_CODE_VERSION:-2.1.332}"
CACHE_DIR="${LLAMABRIDGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llamabridge}"
PREFIX="$CACHE_DIR/claude-code-$CLAUDE_CODE_VERSION"

find_bin() {
    local arch
    case "$(uname -m)" in
        x86_64) arch=x64 ;;
        aarch64|arm64) arch=arm64 ;;
        *) arch="$(uname -m)" ;;
    esac
    for candidate in \
        "$1/node_modules/@anthropic-ai/claude-code-linux-$arch/claude" \
        "$1/node_modules/@anthropic-ai/claude-code/bin/claude" \
        "$1/node_modules/.bin/claude"; do
        if [ -x "$candidate" ]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

if bin=$(find_bin "$PREFIX"); then
    echo "$bin"
    exit 0
fi

if ! command -v npm >/dev/null; then
    echo "installing Claude Code needs npm (Debian: apt-get install npm, or Node.js 20+)" >&2
    exit 1
fi

staging="$PREFIX.tmp.$$"
rm -rf "$staging"
mkdir -p "$staging"
echo "installing @anthropic-ai/claude-code@$CLAUDE_CODE_VERSION into $PREFIX (first run only)" >&2
npm install --prefix "$staging" --no-audit --no-fund --loglevel=error \
    "@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION" >&2
rm -rf "$PREFIX"
mv "$staging" "$PREFIX"
if ! bin=$(find_bin "$PREFIX"); then
    echo "npm installed @anthropic-ai/claude-code but no claude binary was found under $PREFIX" >&2
    exit 1
fi
echo "$bin"
