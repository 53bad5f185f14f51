# The Waha application image: one image for the API (uvicorn), the Celery
# worker and the one-shot migrations; docker-compose.yml picks the command.
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

# uv pinned so that the build reads uv.lock the same way every time.
ARG UV_VERSION=0.13.9

# Byte-compile at build time (UV_COMPILE_BYTECODE): the running user cannot
# write next to the code. The environment lives in /opt/venv, outside /app,
# so that copying the sources over /app can never replace it.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN pip install --no-cache-dir "uv==${UV_VERSION}"

WORKDIR /app

# Dependencies first, from the lock file only: this layer is rebuilt when
# pyproject.toml or uv.lock change, not on every code change.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-install-project --no-cache

# Then the code, and the project itself (without the dev group).
COPY . .
RUN uv sync --frozen --no-dev --no-cache

# Run as an unprivileged user; the code and the environment stay root-owned
# and read-only to it.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin waha
USER waha

EXPOSE 8000
# uvicorn's worker processes (one Python process uses one core); set it to the
# cores the container has.
ENV WEB_CONCURRENCY=2
# No uvicorn access log: it prints raw URLs, whose query strings carry patient
# data; the API logs each request by route template instead.
CMD ["uvicorn", "hub.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", "--no-access-log"]
