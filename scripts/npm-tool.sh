# Sourced by the scripts that install a command-line agent from npm for the end-to-end tests
# (claude-code.sh, codex.sh, opencode.sh, continue.sh, cline.sh). Not run on its own.
#
# npm_tool PACKAGE VERSION NAME CANDIDATE...
#   Prints the first CANDIDATE (a path relative to the install) that is executable, installing
#   PACKAGE@VERSION first if none is. The install goes into a cache outside the work tree, keyed
#   by NAME and VERSION, so only the first run downloads it, and it is staged and moved into
#   place whole, so an interrupted run never leaves a half-installed cache behind.

NPM_TOOL_CACHE="${LLAMABRIDGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llamabridge}"

# npm's platform packages name the CPU as Node does.
npm_arch() {
    case "$(uname -m)" in
        x86_64) echo x64 ;;
        aarch64|arm64) echo arm64 ;;
        *) uname -m ;;
    esac
}

_npm_tool_find() {
    local prefix=$1 candidate
    shift
    for candidate in "$@"; do
        if [ -x "$prefix/$candidate" ]; then
            echo "$prefix/$candidate"
            return 0
        fi
    done
    return 1
}

npm_tool() {
    local package=$1 version=$2 name=$3
    shift 3
    local prefix="$NPM_TOOL_CACHE/$name-$version" bin staging
    if bin=$(_npm_tool_find "$prefix" "$@"); then
        echo "$bin"
        return 0
    fi
    if ! command -v npm >/dev/null; then
        echo "installing $package needs npm (Debian: apt-get install npm, or Node.js 20+)" >&2
        return 1
    fi
    staging="$prefix.tmp.$$"
    rm -rf "$staging"
    mkdir -p "$staging"
    echo "installing $package@$version into $prefix (first run only)" >&2
    npm install --prefix "$staging" --no-audit --no-fund --loglevel=error "$package@$version" >&2
    rm -rf "$prefix"
    mv "$staging" "$prefix"
    if ! bin=$(_npm_tool_find "$prefix" "$@"); then
        echo "npm installed $package but none of $* was found under $prefix" >&2
        return 1
    fi
    echo "$bin"
}
