"""The ``knowmap`` command line. Each command validates its options, then calls the core; errors are one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from knowmap.config import KnowMapConfig, load_config
from knowmap.errors import KnowMapError

app = typer.Typer(
    name="knowmap",
    help="KnowMap on Ray: knowledge bases and a fine-tuned retriever that adapt frozen LLM agents to ScienceWorld.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML or TOML config file.",
                                                   exists=True, dir_okay=False)]
DataDirOption = Annotated[Path | None, typer.Option("--data-dir", help="Where KBs and models are written.")]


def _config(
    config_file: Path | None, data_dir: Path | None, scienceworld: dict[str, Any] | None = None
) -> KnowMapConfig:
    base = load_config(config_file)
    overrides: dict[str, Any] = {}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if scienceworld:
        overrides["scienceworld"] = {**base.scienceworld.model_dump(), **scienceworld}
    return load_config(config_file, **overrides) if overrides else base


@app.command("build-kb")
def build_kb(
    tasks: Annotated[str | None, typer.Option(help="Comma-separated ScienceWorld tasks, or 'all' for all 30.")] = None,
    variations: Annotated[int | None, typer.Option(min=1, help="Variations per task, from the split's start.")] = None,
    split: Annotated[str | None, typer.Option(help="train, dev or test (build KBs from train).")] = None,
    workers: Annotated[int | None, typer.Option(
        min=0, help="Agent actors in the Ray rollout pool; default ray.num_workers or the number of cores; "
                    "0 = no Ray, one env in this process.")] = None,
    config_file: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Replay gold trajectories and build one env KB per episode and the experiential KB."""
    from tqdm import tqdm

    sw: dict[str, Any] = {}
    if tasks is not None:
        sw["tasks"] = [t for t in tasks.split(",") if t.strip()]
    if variations is not None:
        sw["variations"] = variations
    if split is not None:
        sw["split"] = split
    config = _config(config_file, data_dir, sw)
    bar = tqdm(total=None, unit="episode", desc="build-kb", file=sys.stderr)

    def progress(episode: Any, number: int, total: int) -> None:
        bar.total = total
        bar.set_postfix_str(f"{episode.task}/{episode.variation}: {episode.steps} steps, {episode.facts} facts, "
                            f"{episode.subgoals} sub-goals")
        bar.update(1)

    try:
        if workers == 0:
            from knowmap.build import build_knowledge_bases

            summary = build_knowledge_bases(config, on_episode=progress)
        else:
            summary = _build_on_ray(config, workers, progress)
    finally:
        bar.close()
    typer.echo(f"episodes   {summary.episodes}")
    typer.echo(f"steps      {summary.steps}")
    typer.echo(f"facts      {summary.facts}  (env KBs, open and closed)")
    typer.echo(f"sub-goals  {summary.subgoals}")
    typer.echo(f"env KBs    {summary.env_kb_dir}/<episode_id>/  (snapshot + write-ahead log)")
    typer.echo(f"trajectory {config.trajectories_dir}/<episode_id>.json")
    typer.echo(f"experience {summary.experience_store}  collection {summary.experience_collection} "
               f"({summary.experience_rows} rows)")
    typer.echo(f"summary    {config.data_dir / 'build_summary.json'}  ({summary.seconds:.1f} s)")


def _build_on_ray(config: KnowMapConfig, workers: int | None, progress: Any) -> Any:
    import ray

    from knowmap.actors.experience import release_experience_kb
    from knowmap.actors.runtime import build_with_pool

    local = not config.ray.address
    try:
        return build_with_pool(config, workers, on_episode=progress)
    finally:
        if local and ray.is_initialized():
            # A local Ray ends with this command: release the Milvus Lite file and stop the cluster.
            release_experience_kb(config)
            ray.shutdown()


@app.command("config")
def show_config(config_file: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Print the configuration in force (defaults, file, KNOWMAP_* env vars) as JSON."""
    typer.echo(json.dumps(_config(config_file, data_dir).model_dump(mode="json"), indent=2))


def main() -> None:
    """Entry point of the ``knowmap`` console script: known errors end with one line and exit code 2."""
    try:
        app()
    except KnowMapError as e:
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
