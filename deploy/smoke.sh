#!/usr/bin/env bash
# Smoke test of the image: build it with the commands docs/DEPLOY.md quotes (verbatim:
# tests/test_deploy.py checks it), start a container, wait for the gRPC health check, stream a session
# through it with the project's client, check that a metric moved, stop it with SIGTERM (graceful
# drain) and remove it. Bounded in time; talks to loopback only.
#
#   deploy/smoke.sh                                     # Docker Hub and PyPI reachable
#   SMOKE_BASE=debootstrap deploy/smoke.sh              # no Docker Hub: a debootstrap base (as root or with sudo)
#   SMOKE_VARIANT=gpu deploy/smoke.sh                   # the GPU image (rnnserve:gpu), run on the CPU provider
#   SMOKE_VARIANT=gpu SMOKE_GPUS=all deploy/smoke.sh    # ... run with --gpus all on the CUDA provider
#
# Needs: a Docker client and daemon (no BuildKit needed; DOCKER=/path/to/docker picks the client), and
# the project installed on the host (`pip install -e .`) for `rnnserve health` and `rnnserve stream`.
# SMOKE_BASE=debootstrap builds local/debian-python:bookworm first unless it exists (and needs
# debootstrap). SMOKE_NETWORK=host runs the build and the container on the host network (for daemons
# without bridge networking); the default publishes the ports on 127.0.0.1.
# SMOKE_VARIANT=gpu builds the GPU image and checks that its onnxruntime offers the CUDA provider.
# Without SMOKE_GPUS it also checks that the image, on its own provider (cuda) and no GPU, refuses to
# start (exit 1), then serves with RNNSERVE_EXECUTION_PROVIDER=cpu; with SMOKE_GPUS (a `docker run
# --gpus` value, NVIDIA container runtime needed) it serves on the GPUs and checks that the models
# loaded on CUDAExecutionProvider.
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKER=${DOCKER:-docker}
BASE=${SMOKE_BASE:-hub}
VARIANT=${SMOKE_VARIANT:-cpu}
GPUS=${SMOKE_GPUS:-}
NETWORK=${SMOKE_NETWORK:-bridge}
MODEL=${SMOKE_MODEL:-timer_lstm}
STEPS=200
NAME="rnnserve-smoke-$$"

log() { printf '[smoke] %s\n' "$*" >&2; }
case "$MODEL" in
    timer_*) ;;  # one stream of $STEPS steps: what the steps check below counts
    *) log "SMOKE_MODEL must be a timer model (its demo is one stream of $STEPS steps)"; exit 2 ;;
esac
case "$VARIANT" in  # the tags the documented commands build
    cpu) IMAGE=rnnserve ;;
    gpu) IMAGE=rnnserve:gpu ;;
    *) log "SMOKE_VARIANT must be cpu or gpu, not $VARIANT"; exit 2 ;;
esac
[ -z "$GPUS" ] || [ "$VARIANT" = gpu ] || { log "SMOKE_GPUS needs SMOKE_VARIANT=gpu"; exit 2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# The documented commands run as written: `docker` is $DOCKER (with --network host added to builds
# when SMOKE_NETWORK=host) and `sudo` is a no-op for root.
docker() {
    if [ "$1" = build ] && [ "$NETWORK" = host ]; then shift; set -- build --network host "$@"; fi
    command "$DOCKER" "$@"
}
sudo() { if [ "$(id -u)" = 0 ]; then "$@"; else command sudo "$@"; fi; }

log "client $(docker version -f '{{.Client.Version}}'), daemon $(docker version -f '{{.Server.Version}}')"
build_started=$(date +%s)
case "$BASE" in
hub)
    log "building $IMAGE from python:3.11-slim"
    if [ "$VARIANT" = cpu ]; then
        docker build -t rnnserve .
    else
        docker build --build-arg EXECUTION_PROVIDER=cuda -t rnnserve:gpu .
    fi
    ;;
debootstrap)
    if ! docker image inspect local/debian-python:bookworm >/dev/null 2>&1; then
        log "making the base image local/debian-python:bookworm with debootstrap"
        sudo debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm /tmp/bookworm http://deb.debian.org/debian
        sudo rm -rf /tmp/bookworm/var/cache/apt/archives/*.deb /tmp/bookworm/var/lib/apt/lists/*
        sudo cp /etc/ssl/certs/ca-certificates.crt /tmp/bookworm/etc/ssl/certs/ca-certificates.crt
        sudo tar -C /tmp/bookworm -c . | docker import - local/debian-python:bookworm
        sudo rm -rf /tmp/bookworm
    fi
    log "building $IMAGE from local/debian-python:bookworm"
    if [ "$VARIANT" = cpu ]; then
        docker build --build-arg BASE_IMAGE=local/debian-python:bookworm -t rnnserve .
    else
        docker build --build-arg BASE_IMAGE=local/debian-python:bookworm --build-arg EXECUTION_PROVIDER=cuda -t rnnserve:gpu .
    fi
    ;;
*) log "SMOKE_BASE must be hub or debootstrap, not $BASE"; exit 2 ;;
esac
log "built in $(( $(date +%s) - build_started )) s; image size $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"

cleanup() { docker rm -f "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT

provider=CPUExecutionProvider
run_args=()
if [ "$VARIANT" = gpu ]; then
    providers=$(docker run --rm --entrypoint python "$IMAGE" -c 'import onnxruntime as o; print(*o.get_available_providers())')
    log "the image's onnxruntime offers: $providers"
    grep -qw CUDAExecutionProvider <<<"$providers" || { log "FAILED: no CUDAExecutionProvider"; exit 1; }
    if [ -n "$GPUS" ]; then
        run_args=(--gpus "$GPUS"); provider=CUDAExecutionProvider
    else
        refused=0
        timeout 120 "$DOCKER" run --rm --network none --name "$NAME" "$IMAGE" >/dev/null 2>&1 || refused=$?
        [ "$refused" = 1 ] || { log "FAILED: on cuda without a GPU it exited $refused, not 1"; exit 1; }
        log "without a GPU the image refuses to start on its provider (cuda): exit 1"
        run_args=(-e RNNSERVE_EXECUTION_PROVIDER=cpu)
    fi
fi

if [ "$NETWORK" = host ]; then
    grpc_port=$(free_port); metrics_port=$(free_port)
    run_args+=(--network host -e RNNSERVE_HOST=127.0.0.1 -e "RNNSERVE_GRPC_PORT=$grpc_port" -e "RNNSERVE_METRICS_PORT=$metrics_port")
else
    run_args+=(-p 127.0.0.1::8001 -p 127.0.0.1::8002)
fi
started=$(date +%s.%N)
docker run -d --name "$NAME" "${run_args[@]}" "$IMAGE" >/dev/null
if [ "$NETWORK" != host ]; then
    grpc_port=$(docker port "$NAME" 8001/tcp | head -n1 | awk -F: '{print $NF}')
    metrics_port=$(docker port "$NAME" 8002/tcp | head -n1 | awk -F: '{print $NF}')
fi

serving_after=""
for _ in $(seq 1 120); do   # at most 60 s: the time from docker run to gRPC health SERVING
    if rnnserve health --target "127.0.0.1:$grpc_port" --timeout-s 0.5 >/dev/null 2>&1; then
        serving_after=$(python3 -c "import time; print(f'{time.time() - $started:.1f}')"); break
    fi
    sleep 0.5
done
[ -n "$serving_after" ] || { docker logs "$NAME" >&2 || true; log "FAILED: never SERVING"; exit 1; }
log "gRPC health SERVING ${serving_after} s after docker run"

status=starting
for _ in $(seq 1 240); do   # at most 60 s more: docker's own HEALTHCHECK (first probe after 10 s)
    status=$(docker inspect -f '{{.State.Health.Status}}' "$NAME")
    [ "$status" = healthy ] && break
    [ "$(docker inspect -f '{{.State.Running}}' "$NAME")" = true ] || break
    sleep 0.25
done
if [ "$status" != healthy ]; then
    docker logs "$NAME" >&2 || true
    log "FAILED: container is $status"; exit 1
fi
log "docker reports healthy $(python3 -c "import time; print(f'{time.time() - $started:.1f}')") s after docker run (its HEALTHCHECK probes every 10 s)"

if ! docker logs "$NAME" 2>&1 | grep "loaded model $MODEL/1 .* on $provider" >/dev/null; then
    docker logs "$NAME" >&2 || true
    log "FAILED: $MODEL did not load on $provider"; exit 1
fi
log "$MODEL loaded on $provider"
rnnserve health --target "127.0.0.1:$grpc_port"
rnnserve stream --target "127.0.0.1:$grpc_port" --model "$MODEL" --steps "$STEPS" --chunk 10 --show 4
metrics=$(python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$metrics_port/metrics', timeout=5).read().decode())")
if ! grep -q "^rnnserve_steps_total{model=\"$MODEL\",version=\"1\"} $STEPS.0$" <<<"$metrics"; then
    log "FAILED: rnnserve_steps_total did not reach $STEPS"; grep '^rnnserve_steps_total' <<<"$metrics" >&2 || true; exit 1
fi
log "metric moved: rnnserve_steps_total{model=\"$MODEL\"} = $STEPS"

docker stop -t 30 "$NAME" >/dev/null
exit_code=$(docker inspect -f '{{.State.ExitCode}}' "$NAME")
if ! docker logs "$NAME" 2>&1 | grep -q 'shutdown: [0-9]* session(s) saved'; then
    log "FAILED: no graceful shutdown in the logs"; exit 1
fi
[ "$exit_code" = 0 ] || { log "FAILED: exit code $exit_code after SIGTERM"; exit 1; }
log "PASSED: stopped gracefully on SIGTERM (exit 0)"
