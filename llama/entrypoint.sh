#!/bin/sh
# Entry point of the compose stack's llama-server containers (compose.yaml mounts it).
#
# llama-server reads its flags from LLAMA_ARG_* variables, but it takes an empty one as set:
# LLAMA_ARG_MODEL= means a model file named "", LLAMA_ARG_THREADS= a thread count of "". Compose
# passes a variable that .env leaves empty as empty, so drop those before starting it.
for name in $(env | sed -n 's/^\(LLAMA_ARG_[A-Z0-9_]*\)=$/\1/p; s/^\(HF_TOKEN\)=$/\1/p'); do
    unset "$name"
done

# --slot-save-path DIR (compose.yaml's command): llama-server refuses a directory that does not
# exist, so create it. The proxy (uid 10001 in its image) shares it to read the prompt caches
# llama-server saves there and to delete the oldest: deleting a file takes write permission on
# the directory, which a fresh volume gives only to root, so hand the directory to that uid.
# The files stay root's and readable by everyone (0644 under the usual umask 022). Run as another
# user than root, the script cannot give the directory away: it is left as it was made.
save_path=
previous=
for arg in "$@"; do
    if [ "$previous" = "--slot-save-path" ]; then
        save_path=$arg
    fi
    previous=$arg
done
if [ -n "$save_path" ]; then
    mkdir -p "$save_path" || exit 1
    if [ "$(id -u)" = 0 ]; then
        chown 10001 "$save_path" || exit 1
    fi
fi

exec "${LLAMA_SERVER:-/app/llama-server}" "$@"
