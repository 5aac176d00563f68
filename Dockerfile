# The one image of llamabridge's Python services: the compose stack runs it twice, as `proxy`
# (python -m proxy) and as `collector` (python -m collector). Built by `make up`.
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY llamabridge ./llamabridge
COPY proxy ./proxy
COPY collector ./collector
COPY dashboard ./dashboard
# Editable, so the source stays at /app next to dashboard/, which the proxy serves from there.
RUN pip install -e . \
    && useradd --system --uid 10001 --no-create-home --home-dir /app llamabridge \
    && mkdir /data && chown llamabridge /data

# A new named volume mounted on /data starts with this directory's owner, so the store is writable.
USER llamabridge
VOLUME ["/data"]
# Inside a container the services must listen on every interface; compose publishes only the
# proxy's port, and only on BIND_ADDR (127.0.0.1 by default), and tells the proxy so
# (PUBLISHED_ADDR) for its start-up check. Run alone, say where you publish it, or add keys:
#   docker run -e PUBLISHED_ADDR=127.0.0.1 -p 127.0.0.1:9090:9090 llamabridge:local
ENV DB_PATH=/data/llamabridge.db \
    PROXY_HOST=0.0.0.0 \
    PROXY_PORT=9090 \
    COLLECTOR_HOST=0.0.0.0 \
    COLLECTOR_PORT=9091
EXPOSE 9090 9091

# The proxy's /healthz answers 200 only while llama-server does; compose gives the collector its own check.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=4)"]
CMD ["python", "-m", "proxy"]
