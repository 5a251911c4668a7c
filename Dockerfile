# syntax=docker/dockerfile:1.7
# Two images from one source tree:
#   docker build --target trainer  -t ghcr.io/lora-operator/trainer:0.1.0 .
#   docker build --target operator -t ghcr.io/lora-operator/operator:0.1.0 .
# The trainer carries torch/diffusers/transformers (CUDA comes with the torch wheels; the node's NVIDIA
# container toolkit provides the driver). The operator carries kopf/aiohttp and the pure config layer
# of lora_trainer (PyYAML only): no torch, no kubernetes client.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---- shared build stage: the source of the one distribution, lora-operator ----------------------
FROM ${PYTHON_IMAGE} AS source
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# Both images install exactly the tested set in uv.lock (versions and hashes; docs/dependencies.md) with
# the uv pinned in scripts/uv-requirements.txt, into /opt/venv, using the image's own Python 3.11.
ENV UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_PYTHON_DOWNLOADS=never \
    UV_NO_CACHE=1
WORKDIR /src
COPY scripts/uv-requirements.txt scripts/
RUN python -m pip install --no-cache-dir --require-hashes -r scripts/uv-requirements.txt
COPY pyproject.toml uv.lock .python-version README.md ./
COPY trainer_image/ trainer_image/
COPY operator/ operator/

# ---- trainer dependencies and package in a virtualenv -------------------------------------------
# torch comes from PyPI as locked: its Linux wheels carry CUDA (the node provides the driver).
FROM source AS trainer-build
RUN uv sync --locked --no-editable --extra trainer

# ---- operator dependencies and package in a virtualenv ------------------------------------------
FROM source AS operator-build
RUN uv sync --locked --no-editable --extra operator

# ---- the trainer image: lora-train (also lora-label, lora-merge) --------------------------------
FROM ${PYTHON_IMAGE} AS trainer
LABEL org.opencontainers.image.title="lora-operator trainer" \
      org.opencontainers.image.description="lora-train: LoRA training of diffusion and language models from S3 to S3" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/scratch \
    TMPDIR=/scratch \
    HF_HOME=/scratch/.cache/huggingface
COPY --from=trainer-build /opt/venv /opt/venv
RUN groupadd --gid 1000 trainer \
    && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /scratch --shell /usr/sbin/nologin trainer \
    && mkdir -p /scratch && chown 1000:1000 /scratch
# The operator mounts a writable emptyDir at /scratch; the root filesystem can stay read-only.
VOLUME ["/scratch"]
WORKDIR /scratch
USER 1000:1000
EXPOSE 9400
ENTRYPOINT ["lora-train"]
CMD ["--help"]

# ---- the operator image: lora-operator ----------------------------------------------------------
FROM ${PYTHON_IMAGE} AS operator
LABEL org.opencontainers.image.title="lora-operator" \
      org.opencontainers.image.description="The LoRATrainingJob operator (kopf)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY --from=operator-build /opt/venv /opt/venv
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["lora-operator"]
