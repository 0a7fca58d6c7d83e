#!/usr/bin/env bash
# A Docker engine for the container tests, on this machine, as root (scripts/test_services.sh
# calls it; so does scripts/compose_smoke.sh):
#   start  installs Debian's docker.io and debootstrap where missing; starts dockerd with no
#          iptables and no default bridge, listening only on its own unix socket, its data, pid
#          file and log under LUMO_DOCKER_DIR; builds the local base image (no registry is
#          reachable: debootstrap + a venv holding the host's CPU torch + `docker import`), tagged
#          with a hash of its recipe so that a rerun reuses it; builds lumo-gpu from the
#          repository's own docker/Dockerfile.gpu on that base. Prints `export` lines:
#            LUMO_TEST_DOCKER_HOST  the engine's socket (a DOCKER_HOST value)
#            LUMO_TEST_BASE_IMAGE   the local base (python 3.11 venv at /opt/venv, CPU torch)
#            LUMO_TEST_GPU_IMAGE    docker/Dockerfile.gpu, target gpu, built on that base
#   stop   stops the dockerd that `start` started, by the pid in its pid file.
# Idempotent: installs only what is missing, starts the engine only when it is down, rebuilds the
# base only when its recipe changed (lumo-gpu goes through the engine's build cache).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STATE="${LUMO_DOCKER_DIR:-/var/lib/lumo-test-docker}"
SOCKET="$STATE/docker.sock"
PIDFILE="$STATE/dockerd.pid"
SUITE=bookworm
GPU_IMAGE=lumo-gpu:test
export DOCKER_HOST="unix://$SOCKET"
# The `# syntax=` line of the Dockerfiles would make BuildKit fetch its frontend from a registry.
export DOCKER_BUILDKIT=0

log() { echo "docker_engine: $*" >&2; }

install_missing() {
    local missing=() package
    for package in docker.io debootstrap "$@"; do
        dpkg-query --show --showformat='${db:Status-Status}' "$package" 2>/dev/null | grep -qx installed \
            || missing+=("$package")
    done
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    fi
}

engine_up() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

start_engine() {
    if engine_up; then
        return
    fi
    mkdir -p "$STATE/data" "$STATE/exec"
    log "starting dockerd on $SOCKET"
    # setsid and a log file: the daemon outlives this script and never holds the caller's stdout
    # (test_services.sh's output is read by command substitution until it closes).
    setsid /usr/sbin/dockerd --iptables=false --ip-masq=false --bridge=none \
        -H "unix://$SOCKET" --data-root "$STATE/data" --exec-root "$STATE/exec" --pidfile "$PIDFILE" \
        </dev/null >>"$STATE/dockerd.log" 2>&1 &
    for _ in $(seq 1 60); do
        engine_up && return
        sleep 0.5
    done
    log "dockerd did not answer on $SOCKET within 30 s; the end of $STATE/dockerd.log:"
    tail -n 20 "$STATE/dockerd.log" >&2
    exit 1
}

stop_engine() {
    [[ -f "$PIDFILE" ]] || return 0
    local pid
    pid="$(cat "$PIDFILE")"
    if kill -0 "$pid" 2>/dev/null; then
        log "stopping dockerd (pid $pid)"
        kill -TERM "$pid"
        # dockerd stops its containers and its containerd before it exits.
        for _ in $(seq 1 60); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "dockerd (pid $pid) still up after 30 s; killing it"
            kill -KILL "$pid"
        fi
    fi
    rm -f "$PIDFILE"
}

# The host's pip settings, as `pip config list` prints them: find-links folders and index URLs.
pip_setting() { python3 -m pip config list 2>/dev/null | sed -n "s/^[^ ]*\.$1='\(.*\)'$/\1/p" | tr ' ' '\n' | sort -u; }

# The base recipe: everything below decides the image's content, so its text (with the inputs it
# reads) is hashed into the tag.
build_base() {
    local tag="$1" tree mirror dir url torch_pin
    mirror="$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n 1)"
    mirror="${mirror:-$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null)}"
    mirror="${mirror:-http://deb.debian.org/debian}"
    torch_pin="$(grep -E '^torch==' "$ROOT/constraints/cpu.txt")"
    tree="$(mktemp -d "$STATE/base.XXXXXX")"
    log "debootstrap $SUITE from $mirror"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,passwd "$SUITE" "$tree" "$mirror" >&2
    # The host reaches the package index through its own CA bundle and pip settings: the image
    # gets the same, so that `pip install` in a build (--network=host) works as it does here.
    cp /etc/ssl/certs/ca-certificates.crt "$tree/etc/ssl/certs/ca-certificates.crt"
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$tree/etc/pip.conf"
    cp /etc/resolv.conf "$tree/etc/resolv.conf"
    # Local wheel folders and file:// indexes of the host, bound read-only at the same paths.
    local binds=() args=()
    for dir in $(pip_setting find-links); do
        [[ -d "$dir" ]] && binds+=("$dir") && args+=(--find-links "$dir")
    done
    for url in $(pip_setting extra-index-url) $(pip_setting index-url); do
        if [[ "$url" == file://* ]]; then
            dir="${url#file://}"
            [[ -d "$dir" ]] && binds+=("$(dirname "$dir")") && args+=(--extra-index-url "$url")
        else
            args+=(--extra-index-url "$url")
        fi
    done
    mount -t proc proc "$tree/proc"
    for dir in "${binds[@]}"; do
        mkdir -p "$tree$dir"
        mount --bind -o ro "$dir" "$tree$dir"
    done
    local status=0
    log "venv with $torch_pin in the base"
    chroot "$tree" /bin/sh -c "python3 -m venv /opt/venv && /opt/venv/bin/pip install --quiet --no-cache-dir --disable-pip-version-check ${args[*]} '$torch_pin'" >&2 \
        || status=$?
    for dir in "${binds[@]}"; do umount "$tree$dir"; done
    umount "$tree/proc"
    if ((status)); then
        rm -rf --one-file-system "$tree"
        log "installing $torch_pin in the base failed"
        exit "$status"
    fi
    rm -rf "$tree/var/cache/apt/archives/"*.deb "$tree/var/lib/apt/lists/"*
    for dir in "${binds[@]}"; do rmdir -p --ignore-fail-on-non-empty "$tree$dir" 2>/dev/null || true; done
    tar --numeric-owner -C "$tree" -c . | docker import \
        --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$tag" >/dev/null
    rm -rf --one-file-system "$tree"
}

base_tag() {
    local recipe
    recipe="$(declare -f build_base pip_setting; echo "$SUITE"; cat "$ROOT/constraints/cpu.txt"; pip_setting find-links; pip_setting extra-index-url; sha256sum /etc/ssl/certs/ca-certificates.crt)"
    echo "lumo-test-base:$(printf '%s' "$recipe" | sha256sum | cut -c1-16)"
}

case "${1:-start}" in
    start)
        install_missing
        start_engine
        base="$(base_tag)"
        if ! docker image inspect "$base" >/dev/null 2>&1; then
            build_base "$base"
        fi
        log "building $GPU_IMAGE from docker/Dockerfile.gpu on $base"
        docker build --quiet --network=host -f "$ROOT/docker/Dockerfile.gpu" --target gpu \
            --build-arg "PYTORCH_IMAGE=$base" -t "$GPU_IMAGE" "$ROOT" >&2
        # The images a rebuild untagged (a machine that runs CI every day would fill its disk);
        # the build cache of the current ones stays.
        docker image prune --force >/dev/null
        echo "export LUMO_TEST_DOCKER_HOST='$DOCKER_HOST'"
        echo "export LUMO_TEST_BASE_IMAGE='$base'"
        echo "export LUMO_TEST_GPU_IMAGE='$GPU_IMAGE'"
        ;;
    stop)
        stop_engine
        ;;
    *)
        echo "usage: $0 [start|stop]" >&2
        exit 2
        ;;
esac
