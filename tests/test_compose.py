"""The Docker Compose stack: pinned images, a complete dependency graph, health, ports, wiring.

There is no Docker engine here, so the file is checked by reading it; where the ``docker
compose`` plugin is installed, its own ``config -q`` validation runs too.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from qmachina.settings import load_settings
from tests.conftest import REPO_ROOT

COMPOSE_FILE = REPO_ROOT / "docker-compose.temporal.yml"
REQUIRED = {"postgresql", "temporal", "temporal-ui", "openfga", "mlflow", "worker", "api"}
STATEFUL = {"postgresql", "temporal", "openfga", "mlflow"}
# Each variable the worker and API read, and the service and container port it must reach.
WIRING = {
    "TEMPORAL_ADDRESS": ("temporal", 7233),
    "QMACHINA_DATABASE_URL": ("postgresql", 5432),
    "MLFLOW_TRACKING_URI": ("mlflow", 5000),
    "OPENFGA_API_URL": ("openfga", 8080),
}
VERSION_TAG = re.compile(r"v?\d+(\.\d+)+([.-][\w.-]+)?")
DEFAULTED = re.compile(r"\$\{(\w+):-([^}]*)\}")


@pytest.fixture(scope="module")
def services() -> dict[str, dict[str, Any]]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert set(document) <= {"name", "services", "volumes", "networks", "configs"} | {
        key for key in document if key.startswith("x-")
    }
    result: dict[str, dict[str, Any]] = document["services"]
    return result


def interpolate(value: str) -> str:
    """Compose's ``${NAME:-default}`` with the defaults; a bare ``$NAME`` is refused."""
    resolved = DEFAULTED.sub(lambda match: match.group(2), value)
    assert "$" not in resolved, f"{value!r}: every variable needs a default"
    return resolved


def tag_of(image: str) -> str:
    name = image.split("@", 1)[0]
    repository, _, tag = name.rpartition(":")
    return tag if repository and "/" not in tag else ""


def container_ports(service: dict[str, Any]) -> dict[int, int]:
    """Published ports of a service: container port -> host port."""
    published = {}
    for mapping in service.get("ports", []):
        host, container = str(mapping).rsplit(":", 1)
        published[int(container)] = int(host.rsplit(":", 1)[-1])
    return published


def test_compose_file_is_valid_where_the_plugin_exists() -> None:
    version = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, text=True, check=False
    )
    if version.returncode == 0:
        checked = subprocess.run(
            ["docker", "compose", "-f", str(COMPOSE_FILE), "config", "-q"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert checked.returncode == 0, checked.stderr
    # Without the plugin the structure is still read and checked below; this file must parse.
    assert isinstance(yaml.safe_load(COMPOSE_FILE.read_text()), dict)


def test_required_services_exist_with_pinned_images(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) >= REQUIRED
    for name, service in services.items():
        image = service.get("image", "")
        tag = tag_of(image)
        assert tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest", f"{name}: image {image!r} is not pinned"
        assert VERSION_TAG.fullmatch(tag), f"{name}: tag {tag!r} is not a version"
        inline = service.get("build", {}).get("dockerfile_inline", "")
        for base in re.findall(r"^FROM\s+(\S+)", inline, flags=re.MULTILINE):
            assert VERSION_TAG.fullmatch(tag_of(base)), f"{name}: base image {base!r}"


def test_every_dependency_exists_and_waits_for_health(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        targets = depends_on if isinstance(depends_on, list) else list(depends_on)
        for target in targets:
            assert target in services, f"{name} depends on unknown service {target!r}"
            if isinstance(depends_on, dict):
                condition = depends_on[target]["condition"]
                if condition == "service_healthy":
                    assert "healthcheck" in services[target], f"{target} has no healthcheck"
    for name in STATEFUL | {"api"}:
        test = services[name]["healthcheck"]["test"]
        assert test[0] in {"CMD", "CMD-SHELL"}, name
        assert len(test) > 1, name
    for name in ("worker", "api"):
        assert set(services[name]["depends_on"]) >= {"postgresql", "temporal", "mlflow", "openfga"}


def test_published_ports_do_not_collide(services: dict[str, dict[str, Any]]) -> None:
    host_ports = [port for s in services.values() for port in container_ports(s).values()]
    assert len(host_ports) == len(set(host_ports)), sorted(host_ports)


def test_worker_and_api_are_wired_to_the_stack(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert services["worker"]["command"] == ["python", "-m", "worker.main"]
    assert "api.main:app" in services["api"]["command"]
    assert services["api"]["command"][0] == "uvicorn"
    for name in ("worker", "api"):
        environment = {k: interpolate(str(v)) for k, v in services[name]["environment"].items()}
        for variable, (target, port) in WIRING.items():
            value = environment[variable]
            address = urlsplit(value if "://" in value else f"tcp://{value}")
            assert (address.hostname, address.port) == (target, port), f"{name}: {variable}"
            published = container_ports(services[target])
            assert not published or port in published, f"{target} does not serve {port}"
        # The environment is what the settings object accepts, with nothing else set.
        monkeypatch.delenv("QMACHINA_SETTINGS_FILE", raising=False)
        for variable, value in environment.items():
            monkeypatch.setenv(variable, value)
        monkeypatch.setenv("QMACHINA_DATA_DIR", str(tmp_path))
        settings = load_settings()
        assert settings.temporal_address == "temporal:7233"
        assert settings.database_url.startswith("postgresql+asyncpg://")
        assert settings.mlflow_tracking_uri == "http://mlflow:5000"
        assert settings.openfga_api_url == "http://openfga:8080"
    assert "--port=5000" in services["mlflow"]["command"]
