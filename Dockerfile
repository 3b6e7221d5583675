# rnnserve: the serving image (no torch, no compilers in the runtime stage).
#
#   docker build -t rnnserve .                                  # CPU image, official slim base
#   docker build --target gpu -t rnnserve:gpu .                 # CUDA execution provider
#   docker build --build-arg BASE_IMAGE=local/debian-python:bookworm \
#       --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt -t rnnserve .   # no Docker Hub
#
# BASE_IMAGE must provide python3 (3.11+) with the venv module. The optional pip_ca secret is a CA
# bundle for pip, for builds behind a TLS-intercepting proxy; it never lands in a layer.

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS venv
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service

FROM venv AS build
RUN --mount=type=secret,id=pip_ca,required=false \
    if [ -f /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    pip install . && pip uninstall --yes pip setuptools

FROM venv AS build-gpu
RUN --mount=type=secret,id=pip_ca,required=false \
    if [ -f /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    pip install . && pip uninstall --yes onnxruntime \
    && pip install "onnxruntime-gpu[cuda,cudnn]>=1.20" && pip uninstall --yes pip setuptools

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
    RNNSERVE_SNAPSHOT_DIR=/var/lib/rnnserve/state
# Session snapshots: mount a volume here so sessions survive a new container.
VOLUME ["/var/lib/rnnserve/state"]
USER 10001
EXPOSE 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 CMD ["rnnserve", "health"]
# Exec form: the server is PID 1 and receives SIGTERM itself, then drains in-flight chunks.
STOPSIGNAL SIGTERM
ENTRYPOINT ["rnnserve", "serve"]

FROM runtime-base AS gpu
COPY --from=build-gpu /opt/venv /opt/venv
ENV RNNSERVE_EXECUTION_PROVIDER=cuda

# The default (last) target: the CPU image.
FROM runtime-base AS cpu
COPY --from=build /opt/venv /opt/venv
