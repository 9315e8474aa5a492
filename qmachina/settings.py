"""The one settings object of every qMachina process, read from the environment and a file.

Precedence, highest first: keyword arguments to :func:`load_settings`, environment variables,
the YAML settings file named by ``QMACHINA_SETTINGS_FILE`` (keys are the field names, e.g.
``data_dir: /srv/qmachina``), then the defaults. Every field is read from ``QMACHINA_<FIELD>``;
three also answer to the names their tools use (``TEMPORAL_ADDRESS``, ``MLFLOW_TRACKING_URI``,
``OPENFGA_API_URL``); when both spellings are set the ``QMACHINA_`` one wins.

The store, MLflow and lake locations default to files under ``data_dir`` unless set
explicitly, so pointing ``QMACHINA_DATA_DIR`` elsewhere moves all of them together.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from qmachina.store.database import default_sqlite_url

ENV_PREFIX = "QMACHINA_"
SETTINGS_FILE_VARIABLE = "QMACHINA_SETTINGS_FILE"
STORE_DRIVERS = ("postgresql+asyncpg", "sqlite+aiosqlite")
MLFLOW_FILE_NAME = "mlflow.sqlite3"
SIGNING_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
"""The asymmetric JWS algorithms a token may be signed with: never ``none``, never an HMAC
(whose secret would be the public key a JWKS publishes)."""
MAX_TOKEN_TTL_SECONDS = 30 * 24 * 3600


def _standard_name(name: str) -> AliasChoices:
    """Read a field from ``QMACHINA_<NAME>`` first, then from the tool's own ``<NAME>``."""
    return AliasChoices(f"{ENV_PREFIX}{name}", name, name.lower())


class SettingsError(ValueError):
    """The settings could not be read; the message names each variable and what is wrong."""


class Settings(BaseSettings):
    """Where qMachina keeps its data and how it reaches Temporal, MLflow and OpenFGA."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    data_dir: Path = Path("data")
    database_url: str = default_sqlite_url(Path("data"))
    temporal_address: str | None = Field(
        default=None, validation_alias=_standard_name("TEMPORAL_ADDRESS")
    )
    """``host:port`` of a Temporal frontend; None: ``qmachina up`` starts the embedded server."""
    temporal_namespace: str = Field(default="default", min_length=1)
    temporal_dev_port: int = Field(default=7233, ge=1, le=65535)
    """The embedded dev server's frontend port (used when ``temporal_address`` is None)."""
    temporal_ui_port: int = Field(default=8233, ge=1, le=65535)
    api_host: str = Field(default="127.0.0.1", min_length=1)
    api_port: int = Field(default=8000, ge=1, le=65535)
    mlflow_tracking_uri: str = Field(
        default=f"sqlite:///{Path('data').resolve() / MLFLOW_FILE_NAME}",
        min_length=1,
        validation_alias=_standard_name("MLFLOW_TRACKING_URI"),
    )
    mlflow_artifact_root: Path = Path("data") / "mlartifacts"
    lake_dir: Path = Path("data") / "lake"
    openfga_api_url: str | None = Field(
        default=None, validation_alias=_standard_name("OPENFGA_API_URL")
    )
    """An OpenFGA server; None: the in-process evaluator of the same model decides."""
    openfga_store_id: str | None = Field(
        default=None, validation_alias=_standard_name("OPENFGA_STORE_ID")
    )
    """The store on the OpenFGA server (``qmachina authz bootstrap`` creates it)."""
    openfga_model_id: str | None = Field(
        default=None, validation_alias=_standard_name("OPENFGA_MODEL_ID")
    )
    """The authorization model in that store (``qmachina authz bootstrap`` writes it)."""
    default_workspace_owner: str | None = None
    """The subject made owner of the ``default`` workspace when the store is set up; None: the
    local user with the dev issuer (so ``qmachina token`` and the CLI work out of the box),
    nobody with an external issuer."""
    configs_dir: Path | None = None
    """The specs the API validates and the workers load; None: the ``configs/`` that ships
    with qMachina."""
    sample_data_dir: Path | None = None
    """Where pipelines' dataset files are found; None: ``../shared/data/databento`` next to
    the checkout."""
    oidc_issuer: str | None = None
    """The OIDC issuer (``iss``) whose tokens the API accepts; None: the local dev issuer,
    whose signing key is kept in ``<data_dir>/auth/``."""
    oidc_audience: str = Field(default="qmachina", min_length=1)
    """The audience (``aud``) a token must be issued for."""
    oidc_jwks_url: str | None = Field(default=None, validate_default=True)
    """The external issuer's JSON Web Key Set; required with ``oidc_issuer``, unset with the
    dev issuer (its key is read from the data directory)."""
    oidc_algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256"], min_length=1)
    """The signature algorithms accepted from the external issuer (the dev issuer signs ES256)."""
    token_ttl_seconds: int = Field(default=3600, ge=60, le=MAX_TOKEN_TTL_SECONDS)
    """How long a token minted by the dev issuer stays valid."""
    databento_api_key: SecretStr | None = Field(
        default=None, validation_alias=_standard_name("DATABENTO_API_KEY")
    )
    """The key live ingestion authenticates with; read by the workers, never sent to Temporal
    nor logged."""
    databento_live_gateway: str | None = None
    """A Databento-compatible live gateway (``qmachina gateway`` for development); None:
    Databento's own."""
    databento_live_port: int = Field(default=13000, ge=1, le=65535)

    @property
    def temporal_target(self) -> str:
        """The Temporal frontend every process connects to: the configured cluster, else the
        embedded dev server on this machine."""
        return self.temporal_address or f"127.0.0.1:{self.temporal_dev_port}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        settings_file = _settings_file()
        if settings_file is not None:
            sources += (YamlConfigSettingsSource(settings_cls, yaml_file=settings_file),)
        return sources

    @field_validator("data_dir", "mlflow_artifact_root", "lake_dir")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        return path.expanduser().resolve()

    @field_validator("database_url")
    @classmethod
    def _store_url(cls, url: str) -> str:
        try:
            driver = make_url(url).drivername
        except ArgumentError:
            raise ValueError("not a database URL") from None
        if driver not in STORE_DRIVERS:
            drivers = ", ".join(f"{name}://" for name in STORE_DRIVERS)
            raise ValueError(f"the store is async: use one of {drivers}")
        return url

    @field_validator("temporal_address")
    @classmethod
    def _host_port(cls, address: str | None) -> str | None:
        if address is None:
            return None
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError("expected host:port")
        return address

    @field_validator("openfga_api_url", "oidc_issuer")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL")
        return url

    @field_validator("oidc_jwks_url")
    @classmethod
    def _jwks_url(cls, url: str | None, info: ValidationInfo) -> str | None:
        if "oidc_issuer" not in info.data:
            return url  # the issuer itself is invalid and reported
        issuer = info.data["oidc_issuer"]
        if url is None and issuer is not None:
            raise ValueError(
                "an external issuer (oidc_issuer) needs the URL of its JSON Web Key Set"
            )
        if url is not None and issuer is None:
            raise ValueError(
                "the local dev issuer reads its key from the data directory: set oidc_issuer "
                "too to verify tokens against this key set"
            )
        return cls._http_url(url)

    @field_validator("oidc_algorithms")
    @classmethod
    def _signing_algorithms(cls, algorithms: list[str]) -> list[str]:
        refused = [name for name in algorithms if name not in SIGNING_ALGORITHMS]
        if refused:
            raise ValueError(
                f"not an accepted signature algorithm: {', '.join(map(repr, refused))} "
                f"(choose from {', '.join(SIGNING_ALGORITHMS)})"
            )
        return algorithms

    @model_validator(mode="after")
    def _derive_from_data_dir(self) -> Settings:
        # Locations not set explicitly follow data_dir wherever it points.
        explicit = self.model_fields_set
        if "database_url" not in explicit:
            self.database_url = default_sqlite_url(self.data_dir)
        if "mlflow_tracking_uri" not in explicit:
            self.mlflow_tracking_uri = f"sqlite:///{self.data_dir / MLFLOW_FILE_NAME}"
        if "mlflow_artifact_root" not in explicit:
            self.mlflow_artifact_root = self.data_dir / "mlartifacts"
        if "lake_dir" not in explicit:
            self.lake_dir = self.data_dir / "lake"
        return self


def _settings_file() -> Path | None:
    value = os.environ.get(SETTINGS_FILE_VARIABLE)
    if not value:
        return None
    path = Path(value).expanduser()
    if path.suffix not in (".yaml", ".yml"):
        raise SettingsError(f"{SETTINGS_FILE_VARIABLE}: {path} is not a .yaml/.yml file")
    if not path.is_file():
        raise SettingsError(f"{SETTINGS_FILE_VARIABLE}: {path} does not exist")
    return path


def variable_names(field: str) -> tuple[str, ...]:
    """The environment variables a field is read from, in precedence order."""
    alias = Settings.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        return tuple(str(choice) for choice in alias.choices if str(choice).isupper())
    return (f"{ENV_PREFIX}{field.upper()}",)


def _field_of(key: str) -> str | None:
    for name in Settings.model_fields:
        if key == name or key in variable_names(name):
            return name
    return None


def _where(key: str) -> str:
    """The variable (or settings-file key) that supplied ``key``, for an error message."""
    field = _field_of(key)
    if field is None:
        return f"{os.environ.get(SETTINGS_FILE_VARIABLE)}: {key}"
    for variable in variable_names(field):
        if variable in os.environ:
            return variable
    settings_file = os.environ.get(SETTINGS_FILE_VARIABLE)
    if settings_file:
        return f"{settings_file}: {field}"
    return field


def load_settings(**overrides: Any) -> Settings:
    """The settings of this process; invalid values raise :class:`SettingsError`."""
    try:
        return Settings(**overrides)
    except ValidationError as error:
        problems = [
            f"{_where(str(issue['loc'][0]))}: {issue['msg']} (got {issue['input']!r})"
            for issue in error.errors(include_url=False)
        ]
        raise SettingsError("invalid settings:\n" + "\n".join(problems)) from None
