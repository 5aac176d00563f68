#!/usr/bin/env bash
# `make keys`: the proxy's API keys (python -m proxy keys), for whichever llamabridge is in use here.
#
#   make keys                                       list them
#   make keys ADD=alice [CONCURRENT=2] [TPM=20000]  add one: printed once, on the last line
#   make keys REMOVE=alice                          revoke one, at once
#
# The compose stack's keys (/data/keys.json in its data volume, through a one-off proxy container:
# the running proxy re-reads the file) when Docker Compose works here and the stack exists, or
# BIND_ADDR (a setting only compose uses) is beyond loopback; otherwise the native proxy's
# (API_KEYS_FILE, by default keys.json beside DB_PATH). KEYS_FOR=compose or KEYS_FOR=native decides.
# The Makefile passes ADD, REMOVE, CONCURRENT, TPM, KEYS_FOR, VENV and MAKE in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."

cmd=keys
# shellcheck source=scripts/compose-lib.sh
source scripts/compose-lib.sh

ADD=${ADD:-} REMOVE=${REMOVE:-} CONCURRENT=${CONCURRENT:-} TPM=${TPM:-} VENV=${VENV:-.venv}
if [[ -n "$ADD" && -n "$REMOVE" ]]; then
    die "ADD=$ADD and REMOVE=$REMOVE: one at a time."
elif [[ -n "$ADD" ]]; then
    args=(add "$ADD")
    [[ -z "$CONCURRENT" ]] || args+=(--concurrent "$CONCURRENT")
    [[ -z "$TPM" ]] || args+=(--tokens-per-minute "$TPM")
elif [[ -n "$CONCURRENT$TPM" ]]; then
    die "CONCURRENT and TPM are the limits of a new key: give them with ADD=<name>."
elif [[ -n "$REMOVE" ]]; then
    args=(remove "$REMOVE")
else
    args=(list)
fi

# Compose checks every variable compose.yaml requires even for a service it does not start:
# Grafana's password is make up's to create.
compose() {
    local password
    password=$(setting GRAFANA_ADMIN_PASSWORD)
    GRAFANA_ADMIN_PASSWORD=${password:-unused} docker compose "$@"
}

compose_in_use() {
    docker_problem || return 1
    [[ -n "$(compose ps -a -q 2>/dev/null)" ]] && return 0
    local bind
    bind=$(setting BIND_ADDR)
    ! is_loopback "${bind:-127.0.0.1}"
}

case "${KEYS_FOR:-}" in
    compose) check_docker ;;
    native) ;;
    "") if compose_in_use; then KEYS_FOR=compose; else KEYS_FOR=native; fi ;;
    *) die "KEYS_FOR=$KEYS_FOR: expected compose or native (or nothing, for the one in use here)." ;;
esac

if [[ "$KEYS_FOR" == compose ]]; then
    echo "make keys: the compose stack's keys (/data/keys.json in its data volume; KEYS_FOR=native for the native proxy's)" >&2
    compose run --rm --no-deps -T proxy python -m proxy keys "${args[@]}"
else
    echo "make keys: the native proxy's keys (API_KEYS_FILE, else keys.json beside DB_PATH; KEYS_FOR=compose for the compose stack's)" >&2
    "${MAKE:-make}" --no-print-directory -s "$VENV/.installed"
    "$VENV/bin/python" -m proxy keys "${args[@]}"
fi
