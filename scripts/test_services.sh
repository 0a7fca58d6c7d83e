#!/usr/bin/env bash
# Installs and starts what the service tests need, on this machine, as root:
#   - a PostgreSQL server from Debian's packages, listening on loopback only, with a role that
#     may create databases (tests/integration/test_postgres_instance.py makes one per run and drops it);
#   - Debian's Chromium (tests/integration/test_ui_browser.py drives it headless; no browser download);
#   - Debian's Redis server binary (tests/integration/test_celery_cluster.py starts its own broker with it);
#   - Debian's nginx and apache2-utils' htpasswd (tests/integration/test_ui_login_proxy.py runs the
#     compose login proxy's config with them, its own nginx on free loopback ports);
#   - a Docker engine and the lumo-gpu image built on a local base (scripts/docker_engine.sh;
#     tests/integration/test_docker_runner.py runs the steps in it).
# Idempotent: installs only what is missing, starts the cluster and the engine only when they are
# down, reuses the images. Prints the environment the tests read, as `export` lines:
#   eval "$(scripts/test_services.sh)" && make test
# `scripts/test_services.sh stop` stops the daemons this script started (the Docker engine, by its
# pid); .ci/run calls it when it ends.
set -euo pipefail

if [[ "${1:-start}" == stop ]]; then
    exec bash "$(dirname "$0")/docker_engine.sh" stop
fi

PG_ROLE=lumo_test
# docker.io and debootstrap for scripts/docker_engine.sh, in the same apt run.
PACKAGES=(postgresql chromium redis-server nginx-light apache2-utils docker.io debootstrap)

log() { echo "test_services: $*" >&2; }

missing=()
for package in "${PACKAGES[@]}"; do
    dpkg-query --show --showformat='${db:Status-Status}' "$package" 2>/dev/null | grep -qx installed \
        || missing+=("$package")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

# Debian's package creates a cluster at install; a machine without one gets it here.
if [[ -z "$(pg_lsclusters --no-header)" ]]; then
    version="$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)"
    log "creating cluster $version/main"
    pg_createcluster "$version" main >&2
fi
read -r pg_version pg_cluster pg_port pg_status _ < <(pg_lsclusters --no-header | head -n 1)
if [[ "$pg_status" != online* ]]; then
    log "starting cluster $pg_version/$pg_cluster on port $pg_port"
    pg_ctlcluster "$pg_version" "$pg_cluster" start >&2
fi
for _ in $(seq 1 30); do
    pg_isready --quiet --host=127.0.0.1 --port="$pg_port" && break
    sleep 1
done
pg_isready --host=127.0.0.1 --port="$pg_port" >&2

# A fresh password every time: nothing to keep secret between runs, nothing fixed in the repo.
pg_password="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
runuser -u postgres -- psql --quiet --no-psqlrc --port="$pg_port" -v ON_ERROR_STOP=1 \
    -v role="$PG_ROLE" -v password="$pg_password" >&2 <<'SQL'
SELECT format('CREATE ROLE %I', :'role')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
ALTER ROLE :"role" WITH LOGIN CREATEDB PASSWORD :'password';
SELECT format('CREATE DATABASE %I OWNER %I', :'role', :'role')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'role') \gexec
SQL

echo "export LUMO_TEST_PG_DSN='postgresql://${PG_ROLE}:${pg_password}@127.0.0.1:${pg_port}/${PG_ROLE}'"
echo "export LUMO_TEST_CHROMIUM='$(command -v chromium)'"
# Debian starts a Redis service at install; the tests use their own server on a free port.
echo "export LUMO_TEST_REDIS='$(command -v redis-server)'"
echo "export LUMO_TEST_NGINX='$(command -v nginx || echo /usr/sbin/nginx)'"
bash "$(dirname "$0")/docker_engine.sh" start
