# aiogateway: the gateway image (the sample services run from it too).
#   docker build -t aiogateway .
#   docker run -p 8002:8002 -e JWT_SECRET=... -e DATABASE_URL=... aiogateway
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies and package first (better layer caching), then the config.
COPY setup.cfg pyproject.toml README.md ./
COPY aiogateway ./aiogateway
COPY plugins ./plugins
COPY migrations ./migrations
# docs: Swagger UI at /docs (without it, /openapi.json only).
RUN pip install ".[uvloop,docs]"

COPY config.toml ./config.toml

# Never run as root. The gateway writes its spools under ./.run/state (server.state_dir).
RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin gateway \
    && mkdir -p /app/.run \
    && chown gateway:gateway /app/.run
USER gateway

EXPOSE 8002

# slim has no curl: ask /healthz with the standard library.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8002/healthz', timeout=2).status == 200 else 1)"]

# Migrations: `aiogateway migrate`, or plugins.audit.migrate = true (the shipped config).
CMD ["aiogateway", "serve", "--config", "/app/config.toml"]
