"""``knowmap retrain``, ``env``, ``milvus``, ``keys``, ``mcp`` and ``export-sft``: the retrain controller, an
operator's env repairs, a local Milvus server, API keys, the MCP server, distillation data."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Any

import ray
import typer

from knowmap.errors import KnowMapError
from knowmap.jobs.cli_common import ConfigOption, DataDirOption
from knowmap.jobs.cli_common import cli_config as _config

retrain_app = typer.Typer(help="The retrain controller: status, a cycle now, rollback.", no_args_is_help=True)


@retrain_app.command("status")
def retrain_status(config_file: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Serving and previous models, the last decision and why, as JSON."""
    from knowmap.jobs.retrain import RetrainController

    status = RetrainController(_config(config_file, data_dir), count_trajectories=lambda: 0).status()
    typer.echo(json.dumps({k: v for k, v in status.items() if k != "history"} | {"cycles": len(status["history"])},
                          indent=2))


@retrain_app.command("run")
def retrain_run(config_file: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """One cycle now: train on all stored experience, gate on held-out dev episodes, promote if better."""
    from knowmap.jobs.retrain import RetrainController
    from knowmap.jobs.session import ray_session

    config = _config(config_file, data_dir)
    with ray_session(config):
        decision = RetrainController(config).retrain(trigger="manual")
    typer.echo(decision["reason"])


@retrain_app.command("watch")
def retrain_watch(
    detach: Annotated[bool, typer.Option(help="Start the named, detached controller actor on the cluster and "
                                              "return (only with ray.address set); it watches again after a "
                                              "restart.")] = False,
    max_cycles: Annotated[int | None, typer.Option(min=1, help="Stop after this many cycles (default: never).")] = None,
    poll: Annotated[float | None, typer.Option(min=0.1, help="Seconds between polls (default retrain.poll_seconds).")
                    ] = None,
    config_file: ConfigOption = None, data_dir: DataDirOption = None,
) -> None:
    """Retrain whenever retrain.every new trajectories arrive: train, gate on held-out dev episodes, promote and
    hot-swap if better. Runs until Ctrl-C; resumes from the state file after a crash or a restart."""
    from knowmap.jobs.retrain import RetrainController, get_retrain_controller
    from knowmap.jobs.session import ray_session

    config = _config(config_file, data_dir)
    if detach and not config.ray.address:
        raise KnowMapError("--detach needs a cluster (ray.address, e.g. KNOWMAP_RAY__ADDRESS=auto): a local Ray "
                           "stops when this command ends")
    with ray_session(config):
        if detach:
            get_retrain_controller(config, watching=True).status.remote()
            typer.echo("the retrain controller watches on the cluster; `knowmap retrain status` shows its decisions")
            return
        controller = RetrainController(config)

        def progress(pending: int, decision: dict[str, Any] | None) -> None:
            if decision is not None:
                typer.echo(f"\n{decision['at']} {decision['reason']}")
            serving = Path(controller.state.serving.embedder).name or "the packaged base embedder"
            typer.echo(f"\r{pending}/{controller.config.retrain.every} new trajectories towards the next cycle; "
                       f"serving {serving}; {len(controller.state.history)} cycles so far ", nl=False)

        with contextlib.suppress(KeyboardInterrupt):
            controller.watch(poll_seconds=poll, max_cycles=max_cycles, progress=progress)
        typer.echo("")


@retrain_app.command("rollback")
def retrain_rollback(config_file: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Serve the previous model again (its experiential collection was kept)."""
    from knowmap.jobs.retrain import RetrainController
    from knowmap.jobs.session import ray_session

    config = _config(config_file, data_dir)
    with ray_session(config):
        status = RetrainController(config).rollback()
    typer.echo(f"serving {status['serving']['embedder'] or 'the packaged base embedder'}")


env_app = typer.Typer(help="Env KBs: an operator's repairs.", no_args_is_help=True)


@env_app.command("reset")
def env_reset(env_id: Annotated[str, typer.Argument(help="the env id, as in /v1/envs/{env_id}")],
              config_file: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Forget every fact of one env, durably; its actor (if running) is ended and revives empty."""
    from knowmap.actors.env_kb import reset_env_kb
    from knowmap.jobs.session import ray_session

    config = _config(config_file, data_dir)
    with ray_session(config):
        before = reset_env_kb(env_id, config)
    typer.echo(f"env {env_id}: {before['facts']} facts through step {before['last_step']} forgotten")


milvus_app = typer.Typer(help="A Milvus server on this machine, for processes that share one store.",
                         no_args_is_help=True)


@milvus_app.command("serve")
def milvus_serve(
    port: Annotated[int, typer.Option(min=1, max=65_535, help="gRPC port (taken: the next free one).")] = 19530,
    folder: Annotated[Path | None, typer.Option("--dir", help="Its data, logs and config (default "
                                                "<data_dir>/milvus); kept, so the next start serves them again.")
                      ] = None,
    config_file: ConfigOption = None, data_dir: DataDirOption = None,
) -> None:
    """Run a Milvus server until Ctrl-C or SIGTERM (the `milvus-server` extra): set store.uri to the address it
    prints, so several Ray nodes or processes share one experiential KB, as on a cluster."""
    import signal
    import time

    from knowmap.jobs.milvus_server import milvus_server

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # Ctrl-C and a plain `kill` both stop the server it started (a shell's background job inherits SIGINT
    # ignored; SIGTERM would otherwise end this process and leave the server running).
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    config = _config(config_file, data_dir)
    base = folder or config.data_dir / "milvus"
    with milvus_server(base, port=port) as uri, contextlib.suppress(KeyboardInterrupt):
        typer.echo(f"Milvus server at {uri} (data in {base}); use it with KNOWMAP_STORE__URI={uri} or "
                   f"`store: {{uri: {uri}}}`; Ctrl-C stops it")
        while True:
            time.sleep(3600)


keys_app = typer.Typer(help="API keys of the retrieval service: one per client, each with its tenant and role.",
                       no_args_is_help=True)


@keys_app.command("add")
def keys_add(
    tenant: Annotated[str, typer.Option(help="Whose data the key reaches: 1-32 of [a-z0-9_-]; 'default' is the "
                                             "deployment's own namespace.")],
    role: Annotated[str, typer.Option(help="read (retrieve, read facts), write (also add and delete its own), "
                                           "admin (also overwrite or delete any of its tenant's).")] = "write",
    config_file: ConfigOption = None, data_dir: DataDirOption = None,
) -> None:
    """Generate a key and append it to the key file (mode 0600); prints the key once. A running service accepts it
    after its next start or model swap."""
    from knowmap.serve.auth import add_key

    key, path = add_key(_config(config_file, data_dir), tenant, role)  # type: ignore[arg-type]
    typer.echo(key)
    typer.echo(f"added to {path} (tenant {tenant}, role {role})", err=True)


def mcp_command(
    url: Annotated[str | None, typer.Option(help="The retrieval service (default http://serve.host:serve.port).")
                   ] = None,
    key: Annotated[str | None, typer.Option(envvar="KNOWMAP_API_KEY", show_default=False,
                                            help="The API key stdio calls use (default: the deployment's own, from "
                                                 "the key file). Over HTTP each client's own bearer key is used.")
                   ] = None,
    transport: Annotated[str, typer.Option(help="stdio, or streamable-http.")] = "stdio",
    host: Annotated[str, typer.Option(help="streamable-http: bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65_535, help="streamable-http: port (path /mcp).")] = 8765,
    max_sessions: Annotated[int, typer.Option(min=1, max=10_000, help="streamable-http: MCP sessions open at once, "
                                              "all keys together (503 past it).")] = 100,
    sessions_per_key: Annotated[int, typer.Option(min=1, max=10_000, help="streamable-http: sessions open at once "
                                                  "per API key (503 past it).")] = 10,
    session_idle_s: Annotated[float, typer.Option(min=0.1, max=86_400, help="streamable-http: a session with no "
                                                  "request in flight for this long is closed.")] = 60.0,
    key_check_ttl_s: Annotated[float, typer.Option(min=0, max=3_600, help="streamable-http: how long a key the "
                                                   "service accepted at `initialize` is trusted without asking "
                                                   "again.")] = 60.0,
    config_file: ConfigOption = None, data_dir: DataDirOption = None,
) -> None:
    """An MCP server (tools: retrieve, add_observations, add_facts, facts, fact_history, list_envs, delete_env,
    contribute_trajectory, list_trajectories, delete_trajectory, embed, rerank, models) over a running retrieval
    service. Over streamable-http, no session opens without a key the service accepts (docs/service-and-api.md)."""
    from knowmap.serve.auth import load_keys
    from knowmap.serve.mcp_tools import SessionLimits, build_mcp_server, serve_http

    if transport not in ("stdio", "streamable-http"):
        raise KnowMapError(f"--transport must be stdio or streamable-http, got {transport!r}")
    config = _config(config_file, data_dir)
    if transport == "stdio" and not key:
        keys = load_keys(config, generate=False)[1]
        key = keys[0] if keys else ""
    url = url or f"http://{config.serve.host}:{config.serve.port}"
    server = build_mcp_server(url, key or "")
    if transport == "stdio":
        server.run("stdio")
    else:
        serve_http(server, url, host, port, SessionLimits(
            max_sessions=max_sessions, sessions_per_key=sessions_per_key, idle_s=session_idle_s,
            key_check_ttl_s=key_check_ttl_s))


def export_sft_command(
    out: Annotated[Path, typer.Option(help="The SFT file (JSON Lines, chat format).")] = Path("sft.jsonl"),
    hints: Annotated[Path | None, typer.Option(help="The hints file from failed episodes.")
                     ] = Path("hints.jsonl"),
    split: Annotated[list[str] | None, typer.Option(help="Episodes of this split (repeatable; default train).")
                     ] = None,
    min_score: Annotated[float, typer.Option(min=-100, max=100, help="Final score an episode needs to count as a "
                                             "success (the rest give hints).")] = 100.0,
    config_file: ConfigOption = None, data_dir: DataDirOption = None,
) -> None:
    """Distillation data: successful knowledge-guided episodes as chats with the knowledge removed (the student
    sees task and observations, the targets are the teacher's actions), and hints from failed ones' reflections."""
    from knowmap.actors.experience import get_experience_kb
    from knowmap.environment.sciworld import check_split
    from knowmap.jobs.export_sft import export_sft
    from knowmap.jobs.session import ray_session
    from knowmap.schemas import Subgoal

    config = _config(config_file, data_dir)
    splits = [check_split(s) for s in (split or ["train"])]
    with ray_session(config):
        kb = get_experience_kb(config)
        summary = export_sft(config.paths, out, hints, splits=splits, min_score=min_score, stored_subgoals=lambda e: [
            Subgoal.model_validate(g) for g in ray.get(kb.subgoals.remote(e))])
    typer.echo(f"{summary.sft} episodes -> {out}" + (f", {summary.hints} hints -> {hints}" if hints else ""))
    for reason, n in sorted(summary.skipped.items()):
        typer.echo(f"  left out: {n} ({reason})")
