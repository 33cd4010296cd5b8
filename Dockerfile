# Wild-P-Diff service. CPU works out of the box; the torch wheel from PyPI is a CUDA build, so the same
# image uses a GPU when one is passed through (docker compose --profile gpu up api-gpu).
#
#   docker build -t wild-p-diff .
#   docker run -p 8000:8000 -v /path/to/store:/store wild-p-diff
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/wild-p-diff
COPY pyproject.toml README.md ./
COPY model_store/ model_store/
COPY training/ training/
COPY app/ app/
RUN pip install .

# Never run as root. The store and data folders exist in the image, owned by that user, so new named
# volumes mounted there inherit the ownership.
RUN useradd --create-home --uid 1000 wildpdiff \
    && mkdir /store /data \
    && chown wildpdiff:wildpdiff /store /data
USER wildpdiff
VOLUME ["/store", "/data"]

ENV WILDPDIFF_STORE=/store
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
CMD ["wildpdiff", "serve", "--store", "/store", "--host", "0.0.0.0", "--port", "8000"]
