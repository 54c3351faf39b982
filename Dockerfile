# syntax=docker/dockerfile:1
#
# Policy bridge container image.
#
#   docker build -t policy-bridge .
#   docker run --rm -v "$PWD/bridge-data:/data" policy-bridge        # first start: writes config
#   docker run -d  -v "$PWD/bridge-data:/data" -p 29330:29330 policy-bridge
#
# The data directory must be writable by uid/gid 1337. See docs/deployment.md.

# --- builder: install the package and its dependencies into a self-contained venv -------
FROM python:3.11-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN python -m venv /opt/venv

WORKDIR /src
COPY . .
# All dependencies ship manylinux wheels, so no compiler or apt packages are needed.
RUN /opt/venv/bin/pip install --no-cache-dir /src \
    && /opt/venv/bin/python -c "import bridge.entrypoint, bridge.config; bridge.config.default_config_text()"

# --- runtime: slim Python plus the venv, running as an unprivileged user ------------------
# Same base as the builder: the venv's python links to this interpreter.
FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="matrix-policy-bridge" \
      org.opencontainers.image.description="Enterprise policy bridge for Synapse: DLP, federation limits, retention, encrypted audit archive" \
      org.opencontainers.image.licenses="Apache-2.0"

# Fixed ids so volume ownership is predictable: chown -R 1337:1337 <data dir>.
RUN groupadd --system --gid 1337 bridge \
    && useradd --system --uid 1337 --gid 1337 --no-create-home \
       --home-dir /data --shell /usr/sbin/nologin bridge \
    && mkdir -p /data \
    && chown 1337:1337 /data \
    && chmod 0750 /data

COPY --from=builder /opt/venv /opt/venv

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BRIDGE_DATA_DIR=/data

# config.yaml, registration.yaml, the audit keys (by default), the SQLite database (when no
# PostgreSQL URL is set).
VOLUME ["/data"]
WORKDIR /data
USER 1337:1337

# Appservice transactions, the synapse-http-antispam gate, /_bridge/health and /metrics.
EXPOSE 29330

# /_bridge/health answers 200 once the bridge is ready and 503 while it starts, so a
# generous start period covers waiting for Synapse. Uses Python: the slim image has no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('BRIDGE_HEALTH_URL', 'http://127.0.0.1:29330/_bridge/health'), timeout=4)"]

# First start (no /data/config.yaml): write config + registration, explain, exit 0.
# Later: exec `python -m bridge <command> -c /data/config.yaml`; the command defaults to run,
# e.g. `docker run … policy-bridge check-config`.
ENTRYPOINT ["python", "-m", "bridge.entrypoint"]
CMD ["run"]
