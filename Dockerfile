# FaceID service image: `docker compose up` (see docker-compose.yml and docs/SERVICE.md).
#
# PyTorch comes from PyPI: its Linux x86_64 wheels are CUDA builds that carry the CUDA runtime as
# nvidia-* wheels, so the same image trains on a GPU when one is passed in (NVIDIA driver and
# NVIDIA Container Toolkit on the host) and falls back to the CPU otherwise.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed, unprivileged user; the mounted ./models must be writable by this uid (or run with
# `user:` in docker-compose.yml). The server refuses to start, naming the folder, if it is not.
RUN groupadd --gid 10001 faceid \
    && useradd --uid 10001 --gid faceid --create-home --shell /usr/sbin/nologin faceid

WORKDIR /opt/faceid

# The large, rarely changing layer first.
RUN pip install torch==2.14.1 torchvision==0.29.1

COPY pyproject.toml README.md ./
COPY faceid ./faceid
COPY app ./app
RUN pip install . \
    && mkdir -p /data /models \
    && chown faceid:faceid /models

USER faceid
ENV FACEID_DATA_DIR=/data \
    FACEID_MODELS_DIR=/models \
    FACEID_CACHE_DIR=/models/cache
VOLUME ["/models"]
EXPOSE 8000

# /health needs no API key and does no work.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# One server process per models folder: the job queue and runner live in it.
CMD ["faceid", "serve", "--host", "0.0.0.0", "--port", "8000"]
