"""docker-compose.yml without a Docker engine: the Compose Specification's JSON schema, then what
a schema cannot see (names the code reads, start order, GPUs, volumes, commands that exist).

The schema is the copy vendored in check-jsonschema (`--builtin-schema vendor.compose-spec`), so
validation needs no network. Without that tool the schema test skips locally and FAILS in CI:
scripts/check_deploy.sh installs it.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from jobs.schemas import Resources
from jobs.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
HMKD_SERVICES = ("migrate", "api", "worker")
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def _interpolate(value: str) -> str:
    """Compose's `${NAME:-default}` with nothing set, as on a machine without a .env file.

    A variable without a default would make `docker compose up` fail (or silently use an empty
    string) on a fresh checkout, so it fails here.
    """

    def default(match: re.Match[str]) -> str:
        if match["op"] not in (":-", "-"):
            raise AssertionError(
                f"{match[0]} in docker-compose.yml has no default; write ${{{match['name']}:-...}}"
            )
        return match["arg"]

    return _VARIABLE.sub(default, value).replace("$$", "$")


def _resolve(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: _resolve(item) for key, item in node.items()}
    if isinstance(node, list):
        return [_resolve(item) for item in node]
    return _interpolate(node) if isinstance(node, str) else node


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The file as Compose sees it with no .env: anchors merged, variables at their defaults."""
    return _resolve(yaml.safe_load(COMPOSE.read_text()))


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the `- NAME=value` form
        env = dict(item.split("=", 1) for item in env)
    return {name: str(value) for name, value in env.items()}


def _validator() -> str:
    exe = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
    exe = exe or shutil.which("check-jsonschema")
    if exe is None:
        message = (
            "check-jsonschema (the Compose Specification validator) is not installed: run "
            "scripts/check_deploy.sh --compose, or pip install check-jsonschema"
        )
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return exe


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_validator(), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_compose_file_follows_the_compose_specification() -> None:
    result = _validate(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("service", "key", "value", "reported"),
    [
        ("worker", "stop_grace_periode", "5m", "stop_grace_periode"),
        ("api", "depends_on", {"migrate": {"condition": "finished"}}, "depends_on"),
    ],
)
def test_the_schema_check_rejects_a_broken_file(
    tmp_path: Path, service: str, key: str, value: Any, reported: str
) -> None:
    """The validator really validates: a misspelt key and a bad condition are refused."""
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"][service][key] = value
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    result = _validate(path)
    assert result.returncode != 0
    assert reported in result.stdout + result.stderr


def test_services_and_no_obsolete_version_key(compose: dict[str, Any]) -> None:
    assert "version" not in compose, "the Compose Specification has no `version:`; remove it"
    assert set(compose["services"]) == {"postgres", "redis", "migrate", "api", "worker", "flower"}


def test_environment_names_are_settings_fields(compose: dict[str, Any]) -> None:
    fields = set(Settings.model_fields)
    for name in HMKD_SERVICES:
        env = _environment(compose["services"][name])
        assert env, f"{name} has no environment"
        for var in env:
            assert var.startswith("HMKD_"), f"{name}: {var} is not read by jobs.settings"
            assert var.removeprefix("HMKD_").lower() in fields, (
                f"{name}: {var} is no field of jobs.settings.Settings (a typo is ignored silently)"
            )


def test_environment_parses_into_the_team_deployment(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    envs = [_environment(compose["services"][name]) for name in HMKD_SERVICES]
    assert envs.count(envs[0]) == len(envs), "migrate, api and worker must share one configuration"
    for var in [v for v in os.environ if v.startswith("HMKD_")]:
        monkeypatch.delenv(var)
    for var, value in envs[0].items():
        monkeypatch.setenv(var, value)
    settings = Settings()
    assert settings.database_url == "postgresql+psycopg://hmkd:hmkd@postgres:5432/hmkd"
    assert settings.broker_url == "redis://redis:6379/0"
    assert settings.data_dir == Path("/data")
    assert settings.dataset_roots == [Path("/datasets")]
    assert not settings.embedded


def test_database_password_is_the_one_postgres_gets(compose: dict[str, Any]) -> None:
    raw = yaml.safe_load(COMPOSE.read_text())
    password = raw["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert password in raw["x-hmkd"]["environment"]["HMKD_DATABASE_URL"]


def _seconds(duration: str) -> float:
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    unit = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * unit[u] for n, u in parts)


def test_worker_reserves_gpus_and_may_finish_a_checkpoint(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    command = worker["command"]
    assert command[:2] == ["worker", "--queue"]
    queues = {command[i + 1] for i, word in enumerate(command) if word in ("--queue", "-Q")}
    assert Resources().queue in queues, "a spec naming no queue would wait forever"
    assert _seconds(worker["stop_grace_period"]) >= 60
    assert worker.get("shm_size"), "NCCL and DataLoader workers need more than 64 MB of /dev/shm"


def test_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["redis"]["condition"] == "service_healthy", name
    assert services["migrate"]["restart"] == "no", "a one-shot job must not restart"
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        for other in depends:
            assert other in services, f"{name} depends on unknown service {other}"
            if isinstance(depends, dict) and depends[other]["condition"] == "service_healthy":
                assert services[other].get("healthcheck"), f"{other} needs a healthcheck"


def test_healthchecks(compose: dict[str, Any]) -> None:
    for name in ("postgres", "redis", "api"):
        test = compose["services"][name]["healthcheck"]["test"]
        assert test and test[0] in ("CMD", "CMD-SHELL"), name
    assert "/v1/health" in " ".join(compose["services"]["api"]["healthcheck"]["test"])


def _mounts(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Target -> long-syntax mount, whichever syntax the file uses."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            volume = {"source": source, "target": target, "read_only": mode == ["ro"]}
            volume["type"] = "volume" if not source.startswith((".", "/", "~")) else "bind"
        mounts[volume["target"]] = volume
    return mounts


def test_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for mount in _mounts(service).values():
            if mount.get("type", "volume") == "volume":
                assert mount["source"] in declared, f"{name}: volume {mount['source']} undeclared"
    data_sources = {_mounts(services[name])["/data"]["source"] for name in HMKD_SERVICES}
    assert len(data_sources) == 1, "api, worker and migrate must share the artifacts volume"
    for name in ("api", "worker"):
        datasets = _mounts(services[name])["/datasets"]
        assert datasets.get("read_only"), f"{name}: datasets must be mounted read-only"
    assert "/var/lib/postgresql/data" in _mounts(services["postgres"])


def _click_command(path: list[str]) -> Any:
    """The click command `hmkd <path...>` resolves to, through pyproject's entry point."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    module_name, _, _ = pyproject["project"]["scripts"]["hmkd"].partition(":")
    command = typer.main.get_command(importlib.import_module(module_name).app)
    for word in path:
        sub = getattr(command, "commands", {}).get(word)
        assert sub is not None, f"`hmkd {' '.join(path)}` does not exist (stopped at {word!r})"
        command = sub
    return command


def test_commands_exist(compose: dict[str, Any]) -> None:
    """Each service's command is one the installed image has (entrypoint `hmkd`)."""
    services = compose["services"]
    _click_command(services["migrate"]["command"])
    worker = services["worker"]["command"]
    options = {opt for p in _click_command(worker[:1]).params for opt in p.opts}
    assert worker[1] in options
    api = services["api"]
    assert api["entrypoint"] == ["uvicorn"]
    target, factory = api["command"][0], "--factory" in api["command"]
    module_name, _, attr = target.partition(":")
    assert factory and callable(getattr(importlib.import_module(module_name), attr))


def test_flower_watches_the_broker_on_localhost_only(compose: dict[str, Any]) -> None:
    flower = compose["services"]["flower"]
    broker = _environment(compose["services"]["worker"])["HMKD_BROKER_URL"]
    assert f"--broker={broker}" in flower["command"]
    assert all(str(port).startswith("127.0.0.1:") for port in flower["ports"])


def test_every_variable_is_documented_in_the_env_example() -> None:
    example = (ROOT / "deploy" / "compose.env.example").read_text()
    documented = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", example, re.M))
    used = {m["name"] for m in _VARIABLE.finditer(COMPOSE.read_text())}
    assert used <= documented, f"add to deploy/compose.env.example: {sorted(used - documented)}"
