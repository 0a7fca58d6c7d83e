#!/usr/bin/env bash
# The compose deployment (docker/compose.yaml) brought up on this machine, used once, taken down:
#   1. the Docker engine and the local base image (scripts/docker_engine.sh start);
#   2. every image built on that base: the Dagster images through their PYTHON_IMAGE build
#      argument, lumo-gpu through PYTORCH_IMAGE, PostgreSQL from Debian's package
#      (scripts/compose_smoke.yaml overrides the compose file for that, and for the engine socket);
#   3. the stack up; a materialization of tokenized_shards (with token_space and manifest_audit,
#      which it needs) launched through the webserver's GraphQL API, its `lumo` steps run as
#      sibling containers of lumo-gpu by the code location;
#   4. waits for the run's success, reads tokenized_shards' check results back from PostgreSQL
#      (each must have passed), and takes the stack down with its volumes.
# Run as root (it installs packages and starts the engine):  bash scripts/compose_smoke.sh
# Uses Compose v2 (`docker compose`) where present, else Debian's docker-compose 1.29.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PROJECT=lumo-smoke
TIMEOUT_S="${LUMO_SMOKE_TIMEOUT_S:-1800}"
log() { echo "compose_smoke: $(date -u +%T) $*" >&2; }
started=$SECONDS

# The engine is stopped at the end only if this script started it.
engine_was_up=0
DOCKER_HOST="unix://${LUMO_DOCKER_DIR:-/var/lib/lumo-test-docker}/docker.sock" docker version >/dev/null 2>&1 && engine_was_up=1
eval "$(bash "$ROOT/scripts/docker_engine.sh" start)"
export DOCKER_HOST="$LUMO_TEST_DOCKER_HOST" DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0
socket="${DOCKER_HOST#unix://}"

if docker compose version >/dev/null 2>&1; then
    compose_cmd=(docker compose)
else
    if ! command -v docker-compose >/dev/null; then
        log "installing docker-compose"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >&2
    fi
    compose_cmd=(docker-compose)
fi
compose() { "${compose_cmd[@]}" -p "$PROJECT" -f "$ROOT/docker/compose.yaml" -f "$ROOT/scripts/compose_smoke.yaml" "$@"; }

work="$(mktemp -d /tmp/lumo-compose-smoke.XXXXXX)"
chmod 755 "$work"
mkdir -p "$work/data"
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export LUMO_SMOKE_BASE_IMAGE="$LUMO_TEST_BASE_IMAGE" LUMO_DOCKER_SOCKET="$socket" LUMO_IMAGE_TAG=smoke LUMO_RUNNER_GPUS=0 \
    DAGSTER_PG_USERNAME=dagster DAGSTER_PG_DB=dagster DAGSTER_PG_PASSWORD="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')" \
    LUMO_DATA_DIR="$work/data" LUMO_UID="$(id -u)" LUMO_GID="$(id -g)" DOCKER_GID="$(stat -c %g "$socket")" \
    DAGSTER_WEBSERVER_BIND=127.0.0.1 DAGSTER_WEBSERVER_PORT="$port" LUMO_UI_HTPASSWD="$work/ui.htpasswd"
touch "$LUMO_UI_HTPASSWD"
chown "$LUMO_UID:$LUMO_GID" "$work/data"

down() {
    local status=$?
    if ((status)); then
        log "failed; the end of the services' logs:"
        compose logs --no-color --tail=40 >&2 || true
    fi
    log "taking the stack down"
    compose down --volumes --remove-orphans >&2 || true
    rm -rf "$work"
    ((engine_was_up)) || bash "$ROOT/scripts/docker_engine.sh" stop
    log "done in $((SECONDS - started)) s (exit $status)"
}
trap down EXIT

log "building the images on $LUMO_SMOKE_BASE_IMAGE"
compose --profile gpu build >&2
log "starting the stack (webserver on 127.0.0.1:$port)"
compose up -d >&2

graphql() {
    local variables="${2:-}"
    python3 - "$port" "$1" "${variables:-"{}"}" <<'PY'
import json, sys, urllib.request
port, query, variables = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
request = urllib.request.Request(f"http://127.0.0.1:{port}/graphql", data=json.dumps({"query": query, "variables": variables}).encode(),
                                 headers={"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=60) as response:
    body = json.load(response)
if body.get("errors"):
    sys.exit(f"GraphQL errors: {body['errors']}")
print(json.dumps(body["data"]))
PY
}

deadline=$((SECONDS + 600))
until python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/server_info', timeout=5)" 2>/dev/null; do
    ((SECONDS < deadline)) || { log "the webserver did not answer within 600 s"; exit 1; }
    sleep 3
done
# The code location loads in the background of the webserver: wait until it is there.
until graphql '{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus locationOrLoadError { __typename } } } } }' \
    | python3 -c 'import json, sys; entries = json.load(sys.stdin)["workspaceOrError"]["locationEntries"]; sys.exit(not any(e["name"] == "lumo" and e["locationOrLoadError"]["__typename"] == "RepositoryLocation" for e in entries))'; do
    ((SECONDS < deadline)) || { log "the code location lumo did not load within 600 s"; exit 1; }
    sleep 3
done

log "launching token_space, manifest_audit, tokenized_shards through GraphQL"
launch='mutation Launch($params: ExecutionParams!) { launchRun(executionParams: $params) {
  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } ... on RunConfigValidationInvalid { errors { message } } } }'
params='{"params": {"selector": {"repositoryLocationName": "lumo", "repositoryName": "__repository__", "jobName": "__ASSET_JOB",
  "assetSelection": [{"path": ["token_space"]}, {"path": ["manifest_audit"]}, {"path": ["tokenized_shards"]}]}, "runConfigData": {}}}'
launched_at="$(date +%s)"
launched="$(graphql "$launch" "$params")"
run_id="$(python3 -c 'import json, sys; r = json.load(sys.stdin)["launchRun"]; print(r["run"]["runId"]) if r["__typename"] == "LaunchRunSuccess" else sys.exit(f"launch failed: {r}")' <<<"$launched")"
log "run $run_id launched; waiting for it (at most $TIMEOUT_S s)"

deadline=$((SECONDS + TIMEOUT_S))
status_query='query Status($runId: ID!) { runOrError(runId: $runId) { ... on Run { status } } }'
while :; do
    status="$(graphql "$status_query" "{\"runId\": \"$run_id\"}" | python3 -c 'import json, sys; print(json.load(sys.stdin)["runOrError"]["status"])')"
    case "$status" in
        SUCCESS) break ;;
        FAILURE | CANCELED)
            log "run $run_id ended $status; its step failures:"
            graphql 'query Events($runId: ID!) { logsForRun(runId: $runId) { ... on EventConnection { events { __typename ... on MessageEvent { message stepKey level } } } } }' \
                "{\"runId\": \"$run_id\"}" | python3 -c 'import json, sys; [print(e["stepKey"], e["message"][:400]) for e in json.load(sys.stdin)["logsForRun"]["events"] if e.get("level") == "ERROR"]' >&2
            exit 1 ;;
    esac
    ((SECONDS < deadline)) || { log "run $run_id still $status after $TIMEOUT_S s"; exit 1; }
    sleep 5
done
log "run $run_id succeeded"

# The check results as the instance stored them, straight from PostgreSQL.
checks="$(compose exec -T postgres psql --username="$DAGSTER_PG_USERNAME" --dbname="$DAGSTER_PG_DB" --no-align --tuples-only --field-separator=' ' \
    -c "SELECT check_name, execution_status FROM asset_check_executions WHERE run_id = '$run_id' AND asset_key LIKE '%tokenized_shards%' ORDER BY check_name")"
echo "$checks" >&2
[[ -n "$checks" ]] || { log "no check results of tokenized_shards in PostgreSQL for run $run_id"; exit 1; }
if grep -v ' SUCCEEDED$' <<<"$checks" >&2; then
    log "the checks above did not pass"
    exit 1
fi
# The `lumo` steps ran in sibling containers of lumo-gpu (the engine's records, by the runner's
# labels), each removed after it: none is left.
steps="$(docker events --since "$launched_at" --until "$(date +%s)" --filter type=container --filter event=create \
    --filter "label=lumo.run_id=$run_id" --format '{{index .Actor.Attributes "lumo.step"}} {{.Actor.Attributes.image}}' | sort)"
echo "$steps" >&2
grep -q '^tokenized_shards.merge_units lumo-gpu:smoke$' <<<"$steps" || { log "no container of lumo-gpu:smoke ran tokenized_shards.merge_units"; exit 1; }
leftover="$(docker ps -a --quiet --filter "label=lumo.run_id=$run_id")"
[[ -z "$leftover" ]] || { log "containers of run $run_id were left behind: $leftover"; exit 1; }
[[ -f "$LUMO_DATA_DIR/outputs/tokenized_shards/index.json" ]] || { log "no index.json under $LUMO_DATA_DIR/outputs"; exit 1; }
log "passed: $(wc -l <<<"$steps") lumo steps in sibling containers, $(wc -l <<<"$checks") checks of tokenized_shards SUCCEEDED in PostgreSQL"
