# Sourced by the scripts that install a Python tool with pinned dependencies of its own for the
# end-to-end tests (aider.sh, litellm.sh). Not run on its own.
#
# pip_tool NAME VERSION REQUIREMENT EXECUTABLE
#   Prints the path of EXECUTABLE in a virtual environment of its own, installing REQUIREMENT
#   there first if needed. The environment lives in a cache outside the work tree, keyed by NAME
#   and VERSION, so only the first run downloads it. A virtual environment cannot be moved once
#   made, so it is made in place and a stamp written last says it is whole: an interrupted run is
#   started over, never used half-installed.
# pip_tool_prefix NAME VERSION
#   Where that environment is; `[ -f "$(pip_tool_prefix ...)/.installed" ]` says it is there.

PYTHON="${PYTHON:-python3}"
PIP_TOOL_CACHE="${LLAMABRIDGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llamabridge}"

pip_tool_prefix() {
    echo "$PIP_TOOL_CACHE/$1-$2"
}

pip_tool() {
    local name=$1 version=$2 requirement=$3 executable=$4 prefix
    prefix=$(pip_tool_prefix "$name" "$version")
    if [ ! -f "$prefix/.installed" ]; then
        echo "installing $requirement into $prefix (first run only)" >&2
        rm -rf "$prefix"
        mkdir -p "$PIP_TOOL_CACHE"
        "$PYTHON" -m venv "$prefix"
        "$prefix/bin/python" -m pip install --quiet --disable-pip-version-check "$requirement" >&2
        touch "$prefix/.installed"
    fi
    echo "$prefix/bin/$executable"
}
