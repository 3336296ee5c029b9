# syntax=docker/dockerfile:1
# The kvstore daemon image (CPU build of torch; see "GPU images" below).
#
#   docker build -t kvstore:0.1.0 .
#   docker run --rm -p 51061:51061 -p 9400:9400 kvstore:0.1.0 \
#       serve --host 0.0.0.0 --set server.metrics_port=9400 --set server.metrics_host=0.0.0.0
#
# The Helm chart (helm/kvstore) runs it as user 10001 on a read-only root file
# system, with its config in /etc/kvstore/config and the disk tier under
# /var/lib/kvstore.
#
# GPU images: build FROM an NVIDIA CUDA runtime image with Python 3.11 and
# install the CUDA build of torch 2.13.0 that matches the nodes' driver in
# place of the CPU one (e.g. --index-url https://download.pytorch.org/whl/cu128);
# everything else is the same.  The GPU tier and CUDA tensors in the
# connectors need it; the CPU image serves CPU, disk and Redis tiers.

ARG PYTHON=python:3.11-slim-bookworm

FROM ${PYTHON} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/kvstore
ENV PATH=/opt/kvstore/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned, from the CPU index: any other torch requirement pulls the
# multi-GB CUDA build.  The package's own torch==2.13.0 is then satisfied.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kvstore ./kvstore
COPY codecs ./codecs
COPY connectors ./connectors
# Builds the CacheGen C extension too (optional: the codec falls back to torch).
RUN pip install . && python -c "import kvstore.server.daemon, kvstore.admin.cli"

FROM ${PYTHON}
RUN groupadd --gid 10001 kvstore \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin kvstore \
 && mkdir -p /var/lib/kvstore /etc/kvstore \
 && chown 10001:10001 /var/lib/kvstore
COPY --from=build /opt/kvstore /opt/kvstore
# HOME and the caches point at /tmp: the root file system is read-only in the chart.
ENV PATH=/opt/kvstore/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache
USER 10001:10001
WORKDIR /var/lib/kvstore
EXPOSE 51061 9400
ENTRYPOINT ["kvstore"]
CMD ["serve", "--config", "/etc/kvstore/config/kvstore.yaml"]
