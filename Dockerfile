# The one image of llamabridge's Python services: the compose stack runs it twice, as `proxy`
# (python -m proxy) and as `collector` (python -m collector). Built by `make up`.
FROM python:3.11.14-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Every runtime dependency, transitive ones included, at the version and hashes of
# requirements.lock (`make lock` writes it from pyproject.toml): the image is the same on every build.
COPY requirements.lock ./
RUN pip install --require-hashes -r requirements.lock
# Then llamabridge itself, a normal install (the dashboard's page is package data), from a copy
# of the source that does not stay in the image. No build isolation: setuptools is in the lock.
COPY pyproject.toml README.md LICENSE /tmp/src/
COPY llamabridge /tmp/src/llamabridge
COPY proxy /tmp/src/proxy
COPY collector /tmp/src/collector
COPY dashboard /tmp/src/dashboard
RUN pip install --no-deps --no-build-isolation /tmp/src \
    && pip check \
    && rm -rf /tmp/src \
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
