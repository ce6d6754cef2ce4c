# syntax=docker/dockerfile:1
#
# One image for every HMKD process: the API (`uvicorn api.app:create_app --factory`), the GPU
# workers (`hmkd worker --queue gpu`) and the migration job (`hmkd db upgrade`).
#
#   docker build -t hmkd .
#   docker run --rm hmkd --help
#
# Base: torch 2.14.1's Linux wheel is the CUDA 13.0 build and brings its own CUDA libraries
# (cuBLAS, cuDNN, NCCL, ... as nvidia-* wheels), so the base image is there for two things only:
# an Ubuntu the driver hooks of the NVIDIA Container Toolkit know, and NVIDIA_REQUIRE_CUDA=13.0,
# which makes the toolkit refuse to start a worker on a host driver too old for CUDA 13
# (580 or newer) with a message that says so, instead of torch failing later with "CUDA driver
# version is insufficient". The `-base-` flavour of the same tag works too and is ~2 GB smaller:
#   docker build --build-arg CUDA_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04 -t hmkd .
# deploy/README.md says more.

ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04

# ---- python: the base image plus CPython 3.11 (Ubuntu 24.04 ships 3.12; pyproject wants 3.11,
# the release torch 2.14.1's wheels on the build machines are made for).
FROM ${CUDA_IMAGE} AS python
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && apt-get purge -y --auto-remove software-properties-common \
    && rm -rf /var/lib/apt/lists/*

# ---- build: install the project and its pinned dependencies into /opt/venv.
FROM python AS build
ENV VENV=/opt/venv \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# .dockerignore is an allowlist: pyproject.toml, README.md and the Python packages.
COPY . .
# scripts/check_deploy.sh extracts this block verbatim and runs it in a fresh virtual
# environment on a copy of the build context: keep it POSIX sh, keep the INSTALL markers.
RUN <<'INSTALL'
set -eu
python3.11 -m venv "$VENV"
"$VENV/bin/pip" install --no-cache-dir ".[s3]"
cd /
"$VENV/bin/hmkd" --help >/dev/null
"$VENV/bin/python" -c 'import api.app, worker.celery_app, boto3'
INSTALL

# ---- runtime: the interpreter, the virtual environment, a non-root user.
FROM python AS runtime
LABEL org.opencontainers.image.title="hmkd" \
      org.opencontainers.image.description="HMKD job service: API, GPU workers, migrations" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HMKD_DATA_DIR=/data
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin hmkd \
    && mkdir -p /data /datasets \
    && chown hmkd:hmkd /data
COPY --from=build /opt/venv /opt/venv
USER hmkd
WORKDIR /home/hmkd
# Artifacts (checkpoints, student.pt, logs) and, on the embedded default, the SQLite files.
VOLUME ["/data"]
EXPOSE 8000
ENTRYPOINT ["hmkd"]
CMD ["--help"]
