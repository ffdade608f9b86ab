# One image for every service of docker-compose.yml: Ray head and workers, teacher API,
# precompute job. Build: docker-compose build (or docker build -t distillery:latest .).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0

WORKDIR /app

# Dependencies first, from the exact pins, so that code changes reuse this layer.
COPY requirements.lock /app/requirements.lock
RUN pip install -r /app/requirements.lock

# The project itself, editable, without touching the pinned dependencies.
COPY . /app
RUN pip install --no-deps -e /app

# An unprivileged user; the volume mount points are created here so that fresh named
# volumes inherit its ownership.
RUN useradd --create-home --uid 1000 distillery \
    && mkdir -p /data /checkpoints /store \
    && chown -R distillery:distillery /data /checkpoints /store
USER distillery

# 8000 teacher API, 6379 Ray GCS, 8265 Ray dashboard, 10001 Ray client.
EXPOSE 8000 6379 8265 10001
CMD ["distill", "--help"]
