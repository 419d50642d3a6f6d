#!/usr/bin/env bash
# `make docker-smoke`: build the product image on a local Debian base made with debootstrap, run the compose
# service with the CPU override on the host network, drop a tiny dataset into its inbox, wait for the model.
#
# Needs root (dockerd, debootstrap), Debian's docker.io and debootstrap (.ci/run installs them). Nothing is pulled
# from a registry: the base comes from debootstrap (cached in $DROPFIT_SMOKE_CACHE), Python packages from a
# wheelhouse the host's pip downloads (so the build needs no network and no CA bundle inside the image).
# Only the dropfit service runs: the Prometheus and Grafana images would need a registry.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
COMPOSE_BIN=$("$PY" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')
CACHE=${DROPFIT_SMOKE_CACHE:-$HOME/.cache/dropfit-smoke}
BASE_IMAGE=dropfit-smoke-base:bookworm
IMAGE=dropfit:smoke
PORT=${DROPFIT_SMOKE_PORT:-19464}
WORK=$(mktemp -d /tmp/dropfit-smoke.XXXXXX)
PROJECT=$WORK/project
DOCKERD_PID=""

say() { printf '\n== %s\n' "$*"; }
compose() {
  "$COMPOSE_BIN" --project-name dropfit-smoke --project-directory "$PROJECT" \
    -f "$ROOT/compose.yaml" -f "$ROOT/compose.cpu.yaml" -f "$WORK/smoke.yaml" "$@"
}
cleanup() {
  set +e
  if [ -f "$WORK/smoke.yaml" ]; then
    compose logs --no-color dropfit > "$WORK/dropfit.log" 2>&1
    compose down --volumes --timeout 30 > /dev/null 2>&1
  fi
  if [ -n "$DOCKERD_PID" ]; then
    kill "$DOCKERD_PID"
    for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$CACHE" "$PROJECT"

say "docker engine"
if ! docker info > /dev/null 2>&1; then
  dockerd --bridge=none --iptables=false --ip6tables=false > "$CACHE/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 120); do docker info > /dev/null 2>&1 && break; sleep 0.5; done
  docker info > /dev/null || { tail -20 "$CACHE/dockerd.log"; exit 1; }
  echo "started dockerd (pid $DOCKERD_PID)"
fi

say "base image $BASE_IMAGE"
if ! docker image inspect "$BASE_IMAGE" > /dev/null 2>&1; then
  if [ ! -s "$CACHE/base-bookworm.tar" ]; then
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
      bookworm "$WORK/rootfs" http://deb.debian.org/debian > "$WORK/debootstrap.log" 2>&1 \
      || { tail -20 "$WORK/debootstrap.log"; exit 1; }
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
    tar -C "$WORK/rootfs" -cf "$CACHE/base-bookworm.tar.partial" . && mv "$CACHE/base-bookworm.tar.partial" "$CACHE/base-bookworm.tar"
    rm -rf "$WORK/rootfs"
  fi
  docker import "$CACHE/base-bookworm.tar" "$BASE_IMAGE" > /dev/null
fi

say "wheelhouse"
"$PY" - > "$WORK/requirements.txt" <<'EOF'
import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))
print("setuptools>=77\npip")
EOF
"$PY" -m pip download --quiet --only-binary=:all: --dest "$CACHE/wheels" -r "$WORK/requirements.txt" \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

say "image $IMAGE (BASE_IMAGE=$BASE_IMAGE, CPU only)"
mkdir -p "$WORK/context"
cp -r pyproject.toml README.md .dockerignore trainer daemon contract docker "$WORK/context/"
rm -rf "$WORK/context/docker/build-extra/wheels"
cp -r "$CACHE/wheels" "$WORK/context/docker/build-extra/wheels"
docker build --quiet -f "$WORK/context/docker/Dockerfile" --build-arg BASE_IMAGE="$BASE_IMAGE" \
  --build-arg EXTRAS= --build-arg PRETRAINED_WEIGHTS=0 -t "$IMAGE" "$WORK/context"
if docker run --rm --entrypoint sh "$IMAGE" -c 'ls /tmp/build-extra /opt/dropfit/wheels' > /dev/null 2>&1; then
  echo "build inputs leaked into the final image" >&2; exit 1
fi
[ "$(docker run --rm --entrypoint id "$IMAGE" -u)" = 10001 ] || { echo "image does not run as uid 10001" >&2; exit 1; }

say "compose up (CPU override, host network, port $PORT)"
cat > "$WORK/smoke.yaml" <<EOF
services:
  dropfit:
    image: $IMAGE
    pull_policy: never
    network_mode: host
    volumes:
      - ./config.yaml:/etc/dropfit/config.yaml:ro
EOF
sed -e "s/port: 9464/port: $PORT/" -e "s/settle_seconds: 5.0/settle_seconds: 1.0/" -e "s/gpus: auto/gpus: []/" \
  docker/config.yaml > "$PROJECT/config.yaml"
# The data folders belong to the image's unprivileged user, as the README tells users to set them up.
mkdir -p "$PROJECT/inbox" "$PROJECT/outbox" "$PROJECT/state" "$PROJECT/archive" "$PROJECT/staging"
chown 10001:10001 "$PROJECT/inbox" "$PROJECT/outbox" "$PROJECT/state" "$PROJECT/archive" "$PROJECT/staging"
"$COMPOSE_BIN" version
compose config -q
compose up -d --no-build dropfit

say "drop a dataset"
"$PY" - "$PROJECT" <<'EOF'
import os, sys
from pathlib import Path
from trainer.data.demo import make_shapes
project = Path(sys.argv[1])
tiny = make_shapes(project / "staging" / "tiny", classes=2, per_class=6, size_range=(24, 40),
                   job={"target_size": 24, "epochs": 2, "batch_size": 4})
for path in [tiny, *tiny.rglob("*")]:
    os.chown(path, 10001, 10001)
os.rename(tiny, project / "inbox" / "tiny")
EOF

say "wait for the model"
for _ in $(seq 300); do
  if compgen -G "$PROJECT/outbox/*/model.keras" > /dev/null; then break; fi
  sleep 1
done
status=$(cat "$PROJECT"/outbox/*/status.json 2>/dev/null || true)
if ! compgen -G "$PROJECT/outbox/*/model.keras" > /dev/null; then
  compose logs --no-color dropfit | tail -40
  echo "no model after 300 s; status: $status" >&2
  exit 1
fi
for _ in $(seq 30); do grep -q '"state": "succeeded"' "$PROJECT"/outbox/*/status.json && break; sleep 1; done
grep -q '"state": "succeeded"' "$PROJECT"/outbox/*/status.json || { echo "job did not succeed: $status" >&2; exit 1; }
ls "$PROJECT"/outbox/*/
curl -fsS "http://127.0.0.1:$PORT/metrics" | grep '^dropfit_jobs_total{kind="train",outcome="succeeded"} 1.0'
docker exec "$(compose ps -q dropfit)" dropfit health --config /etc/dropfit/config.yaml
say "docker smoke test passed"
