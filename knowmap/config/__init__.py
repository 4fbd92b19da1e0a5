"""Configuration: one ``KnowMapConfig`` split by concern, read from a YAML/TOML file and ``KNOWMAP_*`` env vars.

Precedence, highest first: explicit overrides passed to :func:`load_config`, environment variables
(``KNOWMAP_SCIENCEWORLD__STEP_LIMIT=50``; nested fields use ``__``), the config file (``--config`` or
``KNOWMAP_CONFIG``), then the defaults below, which run on one laptop with no keys and no network.
The config crosses Ray calls as ``model_dump()``. The sections live in :mod:`knowmap.config.sections` and, for the
retrieval service, :mod:`knowmap.config.service`; every name is imported from here.
"""

from __future__ import annotations

import contextvars
import os
import tomllib
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from knowmap.config.sections import (
    DEFAULT_TASKS,
    SIMPLIFICATIONS,
    AgentConfig,
    LLMConfig,
    ModelsConfig,
    RayConfig,
    RetrainConfig,
    RetrievalConfig,
    ScienceWorldConfig,
    StoreConfig,
    TrainingConfig,
)
from knowmap.config.service import KeyConfig, ServeConfig
from knowmap.errors import ConfigError
from knowmap.layout import DataLayout

__all__ = ["DEFAULT_TASKS", "SIMPLIFICATIONS", "AgentConfig", "KeyConfig", "KnowMapConfig", "LLMConfig",
           "ModelsConfig", "RayConfig", "RetrainConfig", "RetrievalConfig", "ScienceWorldConfig", "ServeConfig",
           "StoreConfig", "TrainingConfig", "format_validation_error", "load_config", "read_config_file"]


class KnowMapConfig(BaseSettings):
    """The whole configuration. Defaults run end to end on one machine with no keys and no network."""

    model_config = SettingsConfigDict(
        env_prefix="KNOWMAP_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    data_dir: Path = Field(default=Path("knowmap-data"), description="where KBs, models and reports are written")
    scienceworld: ScienceWorldConfig = Field(default_factory=ScienceWorldConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Absolute, so that actors (whose working directory may differ) write to the same place.
        return value.expanduser().absolute()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _FileSource(settings_cls))

    @property
    def paths(self) -> DataLayout:
        """Every path under ``data_dir`` (:class:`knowmap.layout.DataLayout`)."""
        return DataLayout(root=self.data_dir)

    @property
    def store_uri(self) -> str:
        """The Milvus URI in force: the configured one, or a Milvus Lite file under the data dir."""
        return self.store.uri or str(self.paths.experience_db)


_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("knowmap_config_file", default=None)


class _FileSource(PydanticBaseSettingsSource):
    """Reads the file named by :func:`load_config` (or ``KNOWMAP_CONFIG``), YAML or TOML by suffix."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _config_file.get()
        return read_config_file(path) if path is not None else {}


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a YAML (``.yaml``/``.yml``) or TOML (``.toml``) config file into a dict.

    Raises:
        ConfigError: the file is missing, has another suffix, does not parse, or is not a mapping.
    """
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in {".yaml", ".yml"}:
            data = yaml.safe_load(path.read_text()) or {}
        elif suffix == ".toml":
            data = tomllib.loads(path.read_text())
        else:
            raise ConfigError(f"config file {path} must end in .yaml, .yml or .toml, not {suffix!r}")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"config file {path} does not parse: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, **overrides: Any) -> KnowMapConfig:
    """Build the config from defaults, a file, ``KNOWMAP_*`` env vars and explicit overrides.

    Args:
        path: a YAML or TOML file; None = the file named by ``KNOWMAP_CONFIG``, if set.
        **overrides: top-level sections or fields, e.g. ``data_dir=...`` or ``scienceworld={"tasks": [...]}``.

    Raises:
        ConfigError: a value is invalid; the message names each field (``scienceworld.step_limit``), what was
            given and what is allowed.
    """
    if path is None and os.environ.get("KNOWMAP_CONFIG"):
        path = os.environ["KNOWMAP_CONFIG"]
    token = _config_file.set(Path(path) if path is not None else None)
    try:
        return KnowMapConfig(**overrides)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from e
    finally:
        _config_file.reset(token)


def format_validation_error(error: ValidationError) -> str:
    """One line per invalid field: ``field.path: message (got value)``."""
    lines = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(config)"
        given = item.get("input")
        lines.append(f"{field}: {item['msg']} (got {given!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)
