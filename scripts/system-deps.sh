#!/usr/bin/env bash
# Install the Debian packages the test suite drives, if they are missing: tmux (the interactive
# Claude Code test), chromium (the dashboard, driven by Playwright; Playwright's own browser
# download is not used) and prometheus (with promtool: the Grafana dashboards' queries are run
# against a real Prometheus; the tests start their own, never the packaged service).
# As root it installs them; otherwise it names them and stops.
set -euo pipefail
missing=()
command -v tmux >/dev/null || missing+=(tmux)
command -v chromium >/dev/null || missing+=(chromium)
{ command -v prometheus >/dev/null && command -v promtool >/dev/null; } || missing+=(prometheus)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then
    echo "installing ${missing[*]} (Debian packages)" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
elif command -v sudo >/dev/null; then
    sudo apt-get update -qq >&2
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
else
    echo "the tests need these Debian packages: ${missing[*]} (apt-get install ${missing[*]})" >&2
    exit 1
fi
