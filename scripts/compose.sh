#!/usr/bin/env bash
# `make up | down | logs | ps`: docker compose for llamabridge's stack (compose.yaml), after
# checking what it needs, so a missing piece is named plainly instead of failing half-way.
#
#   make up                            llama-server on the NVIDIA GPU (profile gpu)
#   LLAMA_DEVICE=cpu make up           llama-server from the CPU image (profile cpu)
#   LLAMA_URL=http://host:8080 make up no llama-server here: use the one you run
#
# Settings are read the way Compose reads them: the environment first, then .env.
set -euo pipefail
cd "$(dirname "$0")/.."

# `depends_on: {required: false}` on a service its profile leaves out needs Compose 2.26
# (compose-spec/compose-go#609); older versions refuse the file.
MIN_COMPOSE=2.26.0
cmd=${1:?usage: scripts/compose.sh up|down|logs|ps}
NATIVE="Without Docker: 'make demo' (tiny model, no GPU, no download) or 'LLAMA_MODEL=path.gguf make run'
  runs the same proxy and collector as local processes."

die() {
    printf 'make %s: %s\n' "$cmd" "$1" >&2
    shift
    for line in "$@"; do printf '  %s\n' "$line" >&2; done
    exit 2
}

# A setting from the environment, else from .env as Compose reads it: the last assignment wins,
# `export` is allowed, a quoted value ends at its closing quote, and in an unquoted one a `#`
# after whitespace starts a comment (LLAMA_DEVICE=cpu  # no GPU here).
setting() {
    local name=$1 value
    if [[ -n "${!name:-}" ]]; then
        printf '%s' "${!name}"
    elif [[ -f .env ]]; then
        value=$(sed -n "s/^[[:space:]]*\(export[[:space:]]\{1,\}\)\{0,1\}$name=//p" .env | tail -n 1)
        case "$value" in
            \"*) value=${value#\"} && value=${value%%\"*} ;;
            \'*) value=${value#\'} && value=${value%%\'*} ;;
            *) value=$(printf '%s' "$value" | sed -e 's/[[:space:]]#.*$//' -e 's/[[:space:]]*$//') ;;
        esac
        printf '%s' "$value"
    fi
    return 0
}

check_docker() {
    command -v docker >/dev/null 2>&1 ||
        die "Docker is not installed (no 'docker' command on PATH)." \
            "Install Docker Engine: https://docs.docker.com/engine/install/" "$NATIVE"
    local version
    version=$(docker compose version --short 2>/dev/null) ||
        die "the Docker Compose plugin is missing ('docker compose' is not a docker command here)." \
            "Install it: the docker-compose-plugin package from Docker's repository, or https://docs.docker.com/compose/install/linux/" \
            "$NATIVE"
    version=${version#v}
    if [[ "$(printf '%s\n%s\n' "$MIN_COMPOSE" "$version" | sort -V | head -n 1)" != "$MIN_COMPOSE" ]]; then
        die "Docker Compose $version is too old: llamabridge's compose.yaml needs $MIN_COMPOSE or newer." \
            "Update the docker-compose-plugin package." "$NATIVE"
    fi
    docker info >/dev/null 2>&1 ||
        die "Docker is installed but its engine does not answer ('docker info' failed)." \
            "Start it (sudo systemctl start docker), or add yourself to the docker group and log in again." "$NATIVE"
}

is_loopback() {
    local host
    host=$(printf '%s' "$1" | sed -E 's#^[a-z]+://(\[[^]]*\]|[^/:]*).*#\1#')
    [[ "$host" == "localhost" || "$host" == 127.* || "$host" == "[::1]" || "$host" == "0.0.0.0" ]]
}

# Which llama-server: sets PROFILE (gpu, cpu, or empty for LLAMA_URL's) and checks what it needs.
choose_llama() {
    local url device model repo
    url=$(setting LLAMA_URL)
    if [[ -n "$url" ]]; then
        if is_loopback "$url"; then
            die "LLAMA_URL=$url points inside the proxy's own container, not at your machine." \
                "Use LLAMA_URL=http://host.docker.internal:${url##*:} for a llama-server on this machine" \
                "(started with --host 0.0.0.0, so the containers can reach it), or unset LLAMA_URL to run llama-server in the stack."
        fi
        PROFILE=""
        DESCRIPTION="your llama-server at $url"
        return
    fi
    device=$(setting LLAMA_DEVICE)
    device=${device:-gpu}
    case "$device" in
        gpu)
            if ! docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"nvidia"' &&
                ! command -v nvidia-ctk >/dev/null 2>&1; then
                die "no NVIDIA container toolkit: Docker has no 'nvidia' runtime, so it cannot pass a GPU to llama-server." \
                    "Install it: https://docs.nvidia.com/datacenter/cloud-native/container-toolkit/latest/install-guide.html" \
                    "No NVIDIA GPU? 'LLAMA_DEVICE=cpu make up' runs llama-server from the CPU image." "$NATIVE"
            fi
            ;;
        cpu) ;;
        *) die "LLAMA_DEVICE=$device: expected gpu (the default) or cpu." ;;
    esac
    model=$(setting LLAMA_ARG_MODEL)
    repo=$(setting LLAMA_ARG_HF_REPO)
    if [[ -z "$model" && -z "$repo" ]]; then
        die "no model: set LLAMA_ARG_MODEL or LLAMA_ARG_HF_REPO in .env." \
            "LLAMA_ARG_MODEL=/models/<file>.gguf  serves a GGUF you put in ./models" \
            "LLAMA_ARG_HF_REPO=<user>/<repo>:Q4_K_M  downloads one from Hugging Face, once"
    fi
    if [[ -n "$model" ]]; then
        [[ "$model" == /models/* ]] ||
            die "LLAMA_ARG_MODEL=$model: the container sees ./models as /models, so use /models/<file>.gguf."
        [[ -f "models/${model#/models/}" ]] ||
            die "LLAMA_ARG_MODEL=$model, but there is no models/${model#/models/} here." "Put the GGUF file in ./models."
    fi
    PROFILE=$device
    DESCRIPTION="llama-server from the ${device^^} image, model ${model:-$repo}"
}

# Grafana's admin password: compose refuses to start without one; make one on first use.
ensure_grafana_password() {
    [[ -n "$(setting GRAFANA_ADMIN_PASSWORD)" ]] && return
    local password
    password=$(head -c 24 /dev/urandom | base64 | tr -d '/+=\n')
    [[ -f .env ]] || { cp .env.example .env && echo "created .env from .env.example"; }
    if grep -q '^GRAFANA_ADMIN_PASSWORD=$' .env; then
        sed -i "s/^GRAFANA_ADMIN_PASSWORD=\$/GRAFANA_ADMIN_PASSWORD=$password/" .env
    else
        printf '\n# Generated by make up: the Grafana admin password.\nGRAFANA_ADMIN_PASSWORD=%s\n' "$password" >>.env
    fi
    echo "Grafana admin password generated into .env (GRAFANA_ADMIN_PASSWORD)"
}

all_profiles=(--profile gpu --profile cpu)
check_docker
case "$cmd" in
    up)
        choose_llama
        ensure_grafana_password
        mkdir -p models
        echo "starting llamabridge with $DESCRIPTION"
        COMPOSE_PROFILES=$PROFILE docker compose up --detach --build --remove-orphans
        bind=$(setting BIND_ADDR)
        bind=${bind:-127.0.0.1}
        cat <<EOF

llamabridge is starting (the first model download or load can take a while: make logs).
  proxy      http://$bind:$(setting PROXY_PORT | grep . || echo 9090)   (Anthropic and OpenAI APIs; /dashboard)
  Grafana    http://$bind:$(setting GRAFANA_PORT | grep . || echo 3000)   (user admin, password GRAFANA_ADMIN_PASSWORD in .env)
  make ps    health of every service        make env   settings for Claude Code and Cline
EOF
        ;;
    down) docker compose "${all_profiles[@]}" down ;;
    logs) docker compose "${all_profiles[@]}" logs --follow --tail 100 ;;
    ps) docker compose "${all_profiles[@]}" ps ;;
    *) die "unknown command '$cmd' (up, down, logs or ps)" ;;
esac
