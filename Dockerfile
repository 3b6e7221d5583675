# rnnserve: the serving image (no torch, no compilers in the runtime stage).
#
# Needs no BuildKit: the legacy builder (Debian's docker.io 20.10 by default, a Docker 23+ client
# without buildx) and BuildKit build the same image. docs/DEPLOY.md, "Docker", says which command is
# for which machine:
#   docker build -t rnnserve .                                          # CPU image, official slim base
#   docker build --build-arg EXECUTION_PROVIDER=cuda -t rnnserve:gpu .  # GPU image (CUDA provider)
#   docker build --build-arg BASE_IMAGE=local/debian-python:bookworm -t rnnserve .   # no Docker Hub
#
# BASE_IMAGE must provide python3 (3.11+) with the venv module; pip in the build trusts the base
# image's CA certificates (Debian's pip reads /etc/ssl/certs/ca-certificates.crt).
# The stages run in file order and every one is needed: the legacy builder builds all stages up to
# the target, so a GPU stage would be built (CUDA downloaded) for nothing; EXECUTION_PROVIDER picks
# the variant instead.

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG EXECUTION_PROVIDER=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
# models/ as well, for package data that points into it.
COPY models ./models
# cpu: onnxruntime; cuda or tensorrt: onnxruntime-gpu with the CUDA and cuDNN libraries as wheels
# (its [cuda,cudnn] extra), so the image needs nothing from the host but the NVIDIA driver. On a base
# that has CUDA 13 and cuDNN 9 already (an nvidia/cuda cudnn-runtime image), drop the extra.
RUN pip install . \
    && if [ "$EXECUTION_PROVIDER" != cpu ]; then \
        pip uninstall --yes onnxruntime && pip install "onnxruntime-gpu[cuda,cudnn]>=1.20"; \
    fi \
    && pip uninstall --yes pip setuptools

FROM ${BASE_IMAGE} AS runtime-base
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin rnnserve \
    && mkdir -p /var/lib/rnnserve/state && chown -R 10001 /var/lib/rnnserve
COPY models /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RNNSERVE_HOST=0.0.0.0 \
    RNNSERVE_GRPC_PORT=8001 \
    RNNSERVE_METRICS_PORT=8002 \
    RNNSERVE_MODEL_REPOSITORY=/models \
    RNNSERVE_LOG_FORMAT=json \
    RNNSERVE_SNAPSHOT_DIR=/var/lib/rnnserve/state \
    ORT_DISABLE_TELEMETRY=1
# ORT_DISABLE_TELEMETRY: onnxruntime has Microsoft's usage telemetry built in; onnxruntime-gpu 1.31
# also logs a non-JSON warning at import when it cannot write its id under $HOME/.cache. Both off.
# Session snapshots: mount a volume here so sessions survive a new container.
VOLUME ["/var/lib/rnnserve/state"]
EXPOSE 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 CMD ["rnnserve", "health"]
# Exec form: the server is PID 1 and receives SIGTERM itself, then drains in-flight chunks.
STOPSIGNAL SIGTERM
ENTRYPOINT ["rnnserve", "serve"]

# The image (the last stage, the default target).
FROM runtime-base AS runtime
ARG EXECUTION_PROVIDER=cpu
ENV RNNSERVE_EXECUTION_PROVIDER=${EXECUTION_PROVIDER}
COPY --from=build /opt/venv /opt/venv
# cuda, tensorrt: onnxruntime's CUDA provider library has no search path for the wheels' CUDA and
# cuDNN libraries (without this it fails to load: "libcublasLt.so.13: cannot open shared object
# file"), so their directories go to the dynamic loader's cache (the NVIDIA container runtime's own
# ldconfig keeps them). The build then fails if the provider still misses a library: every one but
# the driver's libcuda.so.1, which the NVIDIA container runtime mounts, must be in the image (for
# tensorrt also TensorRT 10's libnvinfer.so.10, which only a BASE_IMAGE with TensorRT can give:
# PyPI's tensorrt-cu13-libs is a stub that downloads from NVIDIA's own index).
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN if [ "$EXECUTION_PROVIDER" != cpu ]; then \
        find /opt/venv -path '*/site-packages/nvidia/*/lib' -type d > /etc/ld.so.conf.d/rnnserve-cuda.conf \
        && ldconfig \
        && capi=$(find /opt/venv -path '*/onnxruntime/capi' -type d) \
        && libs=("$capi/libonnxruntime_providers_cuda.so") \
        && if [ "$EXECUTION_PROVIDER" = tensorrt ]; then libs+=("$capi/libonnxruntime_providers_tensorrt.so"); fi \
        && missing=$(ldd "${libs[@]}" | awk '/not found/ && $1 != "libcuda.so.1" {print $1}' | sort -u | tr '\n' ' ') \
        && if ! ldconfig -p | grep 'libcudnn\.so\.9 ' > /dev/null; then missing+="libcudnn.so.9"; fi \
        && if [ -n "$missing" ]; then \
            echo "EXECUTION_PROVIDER=$EXECUTION_PROVIDER: onnxruntime-gpu cannot find ${missing% } (docs/DEPLOY.md, 'GPU image')" >&2; exit 1; \
        fi; \
    fi
USER 10001
