# Shell functions shared by scripts/compose.sh (`make up | down | logs | ps`) and scripts/keys.sh
# (`make keys`). Sourced, from the repository's top level; `cmd` names the make target in messages.

# `depends_on: {required: false}` on a service its profile leaves out needs Compose 2.26
# (compose-spec/compose-go#609); older versions refuse the file. Top-level `configs` with
# `content` (Prometheus' keys) needs 2.23.1.
MIN_COMPOSE=2.26.0
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
# Parsed here rather than with python-dotenv: `make up` needs only Docker and bash, no Python on the host.
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

# The host of a URL ("http://[::1]:8080/v1" is "[::1]"); an address without a scheme as it is.
url_host() {
    printf '%s' "$1" | sed -E 's#^[a-z]+://(\[[^]]*\]|[^/:]*).*#\1#'
}

# Whether an address (BIND_ADDR, or a URL's host) is this machine's loopback: 0.0.0.0 is not.
is_loopback() {
    local host
    host=$(url_host "$1")
    [[ "$host" == "localhost" || "$host" == 127.* || "$host" == "[::1]" || "$host" == "::1" ]]
}

# What stops Docker Compose from running llamabridge's stack here, in PROBLEM (a message, then
# what to do); returns 1 then. Docker, the Compose plugin (new enough), and an engine that answers.
docker_problem() {
    PROBLEM=()
    if ! command -v docker >/dev/null 2>&1; then
        PROBLEM=("Docker is not installed (no 'docker' command on PATH)."
                 "Install Docker Engine: https://docs.docker.com/engine/install/" "$NATIVE")
        return 1
    fi
    local version
    if ! version=$(docker compose version --short 2>/dev/null); then
        PROBLEM=("the Docker Compose plugin is missing ('docker compose' is not a docker command here)."
                 "Install it: the docker-compose-plugin package from Docker's repository, or https://docs.docker.com/compose/install/linux/"
                 "$NATIVE")
        return 1
    fi
    version=${version#v}
    if [[ "$(printf '%s\n%s\n' "$MIN_COMPOSE" "$version" | sort -V | head -n 1)" != "$MIN_COMPOSE" ]]; then
        PROBLEM=("Docker Compose $version is too old: llamabridge's compose.yaml needs $MIN_COMPOSE or newer."
                 "Update the docker-compose-plugin package." "$NATIVE")
        return 1
    fi
    if ! docker info >/dev/null 2>&1; then
        PROBLEM=("Docker is installed but its engine does not answer ('docker info' failed)."
                 "Start it (sudo systemctl start docker), or add yourself to the docker group and log in again." "$NATIVE")
        return 1
    fi
}

check_docker() {
    docker_problem || die "${PROBLEM[@]}"
}
