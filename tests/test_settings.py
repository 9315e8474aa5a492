"""The settings object: defaults that follow data_dir, environment precedence, the YAML file."""

from __future__ import annotations

from pathlib import Path

import pytest

from qmachina.settings import Settings, SettingsError, load_settings, variable_names


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No variable of the developer's shell leaks into a test."""
    for field in Settings.model_fields:
        for variable in variable_names(field):
            monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("QMACHINA_SETTINGS_FILE", raising=False)


def test_defaults_derive_from_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    data = tmp_path / "data"
    assert settings.data_dir == data
    assert settings.database_url == f"sqlite+aiosqlite:///{data / 'qmachina.sqlite3'}"
    assert settings.mlflow_tracking_uri == f"sqlite:///{data / 'mlflow.sqlite3'}"
    assert settings.mlflow_artifact_root == data / "mlartifacts"
    assert settings.lake_dir == data / "lake"
    assert settings.temporal_address is None  # qmachina up starts the embedded server
    assert settings.temporal_namespace == "default"
    assert settings.openfga_api_url is None
    assert (settings.api_host, settings.api_port, settings.temporal_ui_port) == (
        "127.0.0.1",
        8000,
        8233,
    )

    monkeypatch.setenv("QMACHINA_DATA_DIR", str(tmp_path / "elsewhere"))
    moved = load_settings()
    assert moved.database_url.endswith(f"{tmp_path}/elsewhere/qmachina.sqlite3")
    assert moved.mlflow_tracking_uri == f"sqlite:///{tmp_path}/elsewhere/mlflow.sqlite3"
    assert moved.lake_dir == tmp_path / "elsewhere" / "lake"


def test_environment_overrides_win(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QMACHINA_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TEMPORAL_ADDRESS", "temporal.prod:7233")
    monkeypatch.setenv("QMACHINA_DATABASE_URL", "postgresql+asyncpg://q@db:5432/qmachina")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("OPENFGA_API_URL", "http://openfga:8080")
    monkeypatch.setenv("QMACHINA_LAKE_DIR", str(tmp_path / "big-disk"))
    monkeypatch.setenv("QMACHINA_API_PORT", "9000")
    settings = load_settings()
    assert settings.temporal_address == "temporal.prod:7233"
    assert settings.database_url == "postgresql+asyncpg://q@db:5432/qmachina"
    assert settings.mlflow_tracking_uri == "http://mlflow:5000"
    assert settings.openfga_api_url == "http://openfga:8080"
    assert settings.lake_dir == tmp_path / "big-disk"
    assert settings.mlflow_artifact_root == tmp_path / "mlartifacts"  # still derived
    assert settings.api_port == 9000

    # The QMACHINA_ spelling wins over the tool's own name; keyword arguments win over both.
    monkeypatch.setenv("QMACHINA_TEMPORAL_ADDRESS", "mine:7233")
    assert load_settings().temporal_address == "mine:7233"
    assert load_settings(temporal_address="given:1").temporal_address == "given:1"


@pytest.mark.parametrize(
    ("variable", "value", "complaint"),
    [
        ("QMACHINA_API_PORT", "eighty", "valid integer"),
        ("QMACHINA_TEMPORAL_UI_PORT", "70000", "less than or equal to 65535"),
        ("TEMPORAL_ADDRESS", "localhost", "expected host:port"),
        ("QMACHINA_DATABASE_URL", "postgresql://db/qmachina", "postgresql+asyncpg://"),
        ("QMACHINA_DATABASE_URL", "not a url", "not a database URL"),
        ("OPENFGA_API_URL", "openfga:8080", "http://"),
    ],
)
def test_a_bad_value_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, complaint: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    message = str(raised.value)
    assert f"{variable}: " in message
    assert complaint in message
    assert repr(value) in message


def test_settings_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings_file = tmp_path / "qmachina.yaml"
    settings_file.write_text(
        f"data_dir: {tmp_path / 'from-file'}\n"
        "temporal_address: temporal.file:7233\n"
        "api_port: 8100\n"
        "mlflow_tracking_uri: http://mlflow.file:5000\n"
    )
    monkeypatch.setenv("QMACHINA_SETTINGS_FILE", str(settings_file))
    settings = load_settings()
    assert settings.data_dir == tmp_path / "from-file"
    assert settings.lake_dir == tmp_path / "from-file" / "lake"
    assert settings.temporal_address == "temporal.file:7233"
    assert settings.api_port == 8100
    assert settings.mlflow_tracking_uri == "http://mlflow.file:5000"

    monkeypatch.setenv("TEMPORAL_ADDRESS", "env:7233")  # the environment beats the file
    assert load_settings().temporal_address == "env:7233"

    settings_file.write_text("api_port: 0\nretention: 7d\n")
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert f"{settings_file}: api_port: Input should be greater than or equal to 1" in str(
        raised.value
    )
    assert f"{settings_file}: retention: Extra inputs are not permitted" in str(raised.value)

    monkeypatch.setenv("QMACHINA_SETTINGS_FILE", str(tmp_path / "missing.yaml"))
    with pytest.raises(SettingsError, match=r"QMACHINA_SETTINGS_FILE: .*missing\.yaml"):
        load_settings()
