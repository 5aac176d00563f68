# llama-server with llama.cpp's RPC backend compiled in, and the ggml-rpc-server worker, for the
# compose stack's `rpc` profile. The ggml-org images are built without -DGGML_RPC (their
# .devops/*.Dockerfile at b11434), so llama/build.sh builds both here: the same pinned source,
# flags and version as `make rpc-server`. CPU only: the layers live on the workers.
FROM python:3.11.14-slim-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake g++ make libssl-dev \
    && rm -rf /var/lib/apt/lists/*
COPY build.sh source.py /src/
# pipefail: a failed build must fail this step, not hand `tail` an empty path to copy from.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN worker=$(LLAMABRIDGE_CACHE=/build-cache bash /src/build.sh rpc-server | tail -n 1) \
    && test -x "$worker" \
    && cp -a "$(dirname "$worker")" /app

# The same base as the build, so the binaries find the C++ runtime they were built against.
FROM python:3.11.14-slim-bookworm
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 libssl3 curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /app /app
WORKDIR /app
# compose.yaml starts llama-server through llama/entrypoint.sh; a worker on another machine:
# docker run --network host --entrypoint /app/ggml-rpc-server <image> --host <its LAN address> --port 50052
ENTRYPOINT ["/app/llama-server"]
