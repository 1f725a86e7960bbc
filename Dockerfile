# vqa on a GPU host: the same Make targets as on a workstation, from the same requirements.lock.
# CUDA 13 runtime to match the locked torch 2.14.1 build (cu13 wheels, nvidia-*-cu13 libraries).
FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04

LABEL org.opencontainers.image.title="vqa" \
      org.opencontainers.image.description="Qwen VL 4-bit QLoRA fine-tuning and prediction for multiple-choice VQA" \
      org.opencontainers.image.licenses="MIT"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    ARTIFACTS_DIR=/artifacts \
    DATA_DIR=/data

# Python 3.11, the version the lock was made with (Ubuntu 24.04 ships 3.12).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent make \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 vqa \
 && mkdir -p /app /artifacts /data /cache/huggingface \
 && chown -R vqa:vqa /app /artifacts /data /cache
USER 1000:1000
WORKDIR /app

# Exactly the lock, nothing else: the venv layer is rebuilt only when the lock changes.
COPY --chown=vqa:vqa requirements.lock Makefile ./
RUN make setup

COPY --chown=vqa:vqa pyproject.toml README.md ./
COPY --chown=vqa:vqa vqa ./vqa
COPY --chown=vqa:vqa scripts ./scripts
COPY --chown=vqa:vqa tests ./tests

CMD ["make", "help"]
