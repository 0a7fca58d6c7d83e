#!/bin/sh
# Entry point of compose_smoke.postgres.Dockerfile: on an empty data folder, a cluster whose
# superuser is POSTGRES_USER (password POSTGRES_PASSWORD, scram over TCP) with the database
# POSTGRES_DB; then the server in the foreground, listening on the compose network.
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    password_file="$(mktemp)"
    printf '%s\n' "$POSTGRES_PASSWORD" >"$password_file"
    initdb --username="$POSTGRES_USER" --pwfile="$password_file" --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$password_file"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    if [ "$POSTGRES_DB" != postgres ]; then
        pg_ctl --wait --silent --options="-c listen_addresses=''" start
        createdb --username="$POSTGRES_USER" "$POSTGRES_DB"
        pg_ctl --wait --silent stop
    fi
fi
exec postgres -c listen_addresses='*'
