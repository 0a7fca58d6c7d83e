# PostgreSQL for scripts/compose_smoke.sh: Debian's package on the local base image, configured
# from the variables docker/compose.yaml gives the `postgres` service (POSTGRES_USER,
# POSTGRES_PASSWORD, POSTGRES_DB), its data in the volume at /var/lib/postgresql/data.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}

# The mirror's current postgresql-15 of bookworm: a stable release, no version pin.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql \
    && chown postgres:postgres /var/lib/postgresql/data /var/run/postgresql

ENV PATH=/usr/lib/postgresql/15/bin:${PATH} \
    PGDATA=/var/lib/postgresql/data
COPY compose_smoke_postgres.sh /usr/local/bin/compose_smoke_postgres.sh
# The account Debian's package creates; its numeric ids depend on the install order.
# hadolint ignore=DL3066
USER postgres
EXPOSE 5432
ENTRYPOINT ["/bin/sh", "/usr/local/bin/compose_smoke_postgres.sh"]
