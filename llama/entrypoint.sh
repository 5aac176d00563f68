#!/bin/sh
# Entry point of the compose stack's llama-server containers (compose.yaml mounts it).
#
# llama-server reads its flags from LLAMA_ARG_* variables, but it takes an empty one as set:
# LLAMA_ARG_MODEL= means a model file named "", LLAMA_ARG_THREADS= a thread count of "". Compose
# passes a variable that .env leaves empty as empty, so drop those before starting it.
for name in $(env | sed -n 's/^\(LLAMA_ARG_[A-Z0-9_]*\)=$/\1/p; s/^\(HF_TOKEN\)=$/\1/p'); do
    unset "$name"
done
exec "${LLAMA_SERVER:-/app/llama-server}" "$@"
