# cti-bridge: one container per tenant. Build: docker build -t cti-bridge .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CTI_BRIDGE_ADMIN_HOST=0.0.0.0 \
    CTI_BRIDGE_ADMIN_PORT=8080 \
    CTI_BRIDGE_DATABASE_URL=sqlite:////data/cti-bridge.db

WORKDIR /app
COPY pyproject.toml requirements.lock README.md alembic.ini ./
COPY alembic ./alembic
COPY cti_bridge ./cti_bridge
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -c requirements.lock . \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin cti \
    && mkdir -p /data && chown cti /data
ENV PATH=/opt/venv/bin:$PATH

USER cti
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/api/health' % os.environ.get('CTI_BRIDGE_ADMIN_PORT', '8080'), timeout=4)" || exit 1
CMD ["cti-bridge", "run"]
