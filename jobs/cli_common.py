"""Options every ``knowmap`` command shares, and the config they make."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from knowmap.config import KnowMapConfig, load_config

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML or TOML config file.",
                                                   exists=True, dir_okay=False)]
DataDirOption = Annotated[Path | None, typer.Option("--data-dir", help="Where KBs and models are written.")]


def cli_config(
    config_file: Path | None, data_dir: Path | None, scienceworld: dict[str, Any] | None = None
) -> KnowMapConfig:
    base = load_config(config_file)
    overrides: dict[str, Any] = {}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if scienceworld:
        overrides["scienceworld"] = {**base.scienceworld.model_dump(), **scienceworld}
    return load_config(config_file, **overrides) if overrides else base
