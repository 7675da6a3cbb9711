# syntax=docker/dockerfile:1
# One image for serving and training: CUDA-capable (the torch wheels carry the CUDA runtime;
# the host driver comes in through the NVIDIA container toolkit) and usable on CPU too.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---- build stage: a self-contained virtualenv --------------------------------------------
FROM ${PYTHON_IMAGE} AS build
# EXTRAS=onnx adds ONNX Runtime for RESNET_SERVE_BACKEND=onnxruntime (CPU hosts)
ARG EXTRAS=""
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu: PyTorch's CPU-only wheels, without
# the CUDA libraries (most of the image's size), for hosts that have no NVIDIA GPU
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY models ./models
COPY training ./training
COPY app ./app
RUN /opt/venv/bin/pip install --no-compile ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
        "torch==2.14.1" "torchvision==0.29.1" \
    && /opt/venv/bin/pip install --no-compile ".${EXTRAS:+[$EXTRAS]}"

# ---- runtime stage: no compilers, non-root, tcmalloc preloaded ---------------------------
FROM ${PYTHON_IMAGE} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends libtcmalloc-minimal4=2.10-1 \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s "$(find /usr/lib -name libtcmalloc_minimal.so.4 | head -n 1)" /usr/local/lib/libtcmalloc.so \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin serve \
    && mkdir -p /checkpoints /data /home/serve/.cache/torch /home/serve/.cache/matplotlib \
    && chown 10001:10001 /checkpoints /data \
    && chown -R 10001:10001 /home/serve/.cache \
    && chmod 1777 /home/serve/.cache/torch /home/serve/.cache/matplotlib
# the caches exist in the image, so a volume mounted on one starts with its owner and mode
# (not root's); sticky and open to all, like /tmp, for training run as the host's user
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LD_PRELOAD=/usr/local/lib/libtcmalloc.so \
    TORCH_HOME=/home/serve/.cache/torch \
    MPLCONFIGDIR=/home/serve/.cache/matplotlib \
    RESNET_SERVE_HOST=0.0.0.0 \
    RESNET_SERVE_PORT=8000 \
    RESNET_SERVE_CHECKPOINT_DIR=/checkpoints \
    RESNET_SERVE_LOG_FORMAT=json
USER 10001:10001
WORKDIR /home/serve
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('RESNET_SERVE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["python", "-m"]
CMD ["app"]
