"""The ``knowmap`` command line. Each command parses its options, then calls a job; errors are one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from knowmap.config import KnowMapConfig
from knowmap.errors import KnowMapError
from knowmap.jobs.cli_common import ConfigOption, DataDirOption
from knowmap.jobs.cli_common import cli_config as _config
from knowmap.jobs.cli_ops import env_app, export_sft_command, keys_app, mcp_command, milvus_app, retrain_app

app = typer.Typer(
    name="knowmap",
    help="KnowMap on Ray: knowledge bases and a fine-tuned retriever that adapt frozen LLM agents to ScienceWorld.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

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

    from knowmap.jobs.build import build_knowledge_bases
    from knowmap.jobs.console import Console

    sw: dict[str, Any] = {}
    if tasks is not None:
        sw["tasks"] = [t for t in tasks.split(",") if t.strip()]
    if variations is not None:
        sw["variations"] = variations
    if split is not None:
        sw["split"] = split
    config = _config(config_file, data_dir, sw)
    bar = tqdm(total=None, unit="episode", desc="build-kb", file=sys.stderr)

    try:
        summary = build_knowledge_bases(config, workers, on_episode=Console.episode_progress(bar))
    finally:
        bar.close()
    typer.echo(f"episodes   {summary.episodes}")
    typer.echo(f"steps      {summary.steps}")
    typer.echo(f"facts      {summary.facts}  (env KBs, open and closed)")
    typer.echo(f"sub-goals  {summary.subgoals}")
    typer.echo(f"env KBs    {summary.env_kb_dir}/<episode_id>/  (snapshot + write-ahead log)")
    typer.echo(f"trajectory {config.paths.trajectories}/<episode_id>.json")
    typer.echo(f"experience {summary.experience_store}  collection {summary.experience_collection} "
               f"({summary.experience_rows} rows)")
    typer.echo(f"summary    {config.paths.build_summary}  ({summary.seconds:.1f} s)")


@app.command("train")
def train(
    tasks: Annotated[str | None, typer.Option(help="Comma-separated train tasks to replay; default: the trajectories "
                                                   "build-kb stored, else scienceworld.tasks.")] = None,
    variations: Annotated[int | None, typer.Option(min=1, help="Train variations per task (with --tasks).")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Training epochs (default training.epochs).")] = None,
    reranker: Annotated[bool, typer.Option(help="Also train the cross-encoder reranker.")] = True,
    config_file: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Fine-tune the embedder (InfoNCE) and the reranker on KnowMap pairs from train-split trajectories."""
    from knowmap.jobs.training import train_retriever

    config = _config(config_file, data_dir)
    if epochs is not None:
        config.training.epochs = epochs  # validated on assignment

    def progress(model: str, metrics: dict[str, Any]) -> None:
        typer.echo(f"{model:<9} epoch {metrics.get('epoch')}: loss {metrics.get('loss', float('nan')):.4f}  "
                   f"{metrics.get('samples_per_s', 0.0):.1f} samples/s", err=True)

    report = train_retriever(config, tasks=_split_tasks(tasks), variations=variations, reranker=reranker,
                             on_epoch=progress)
    typer.echo(f"episodes   {report.episodes} (train split; tasks: {', '.join(report.train_tasks)})")
    typer.echo("pairs      " + ", ".join(f"{k} {v}" for k, v in report.pairs.items()))
    for role, model in report.models().items():
        loss = model.final_loss
        typer.echo(f"{role:<10} {model.model_dir}  (final loss {float('nan') if loss is None else loss:.4f})")
    if report.selection:
        chosen = report.selection["chosen"]
        typer.echo(f"selected   {chosen} on dev by " + ", ".join(report.selection["criterion"]) + ": "
                   + json.dumps(report.selection["dev"][chosen]))
    typer.echo(f"curves     {config.paths.training}/loss_*.png")


@app.command("eval-retrieval")
def eval_retrieval(
    split: Annotated[str, typer.Option(help="dev (model selection) or test (reporting).")] = "dev",
    tasks: Annotated[str | None, typer.Option(help="Comma-separated tasks; default scienceworld.tasks.")] = None,
    variations: Annotated[int, typer.Option(min=1, help="Variations per task, from the split's start.")] = 2,
    out: Annotated[Path, typer.Option(help="JSON results; a bar chart is written beside it (.png).")] = Path(
        "retrieval_eval.json"),
    embedder: Annotated[str, typer.Option(help="Fine-tuned embedder dir; default the newest from `train`.")] = "",
    reranker: Annotated[str, typer.Option(help="Reranker dir; default the newest from `train`.")] = "",
    kinds: Annotated[str, typer.Option(help="Comma-separated: env, experience, joint.")] = "env,experience",
    decision: Annotated[bool, typer.Option(help="Also judge decision support by gold next actions (annotated "
                                                "gold replays: ~0.15 s a step, cached).")] = True,
    rerank_modes: Annotated[str, typer.Option(help="Knowledge modes the decision evaluation also re-ranks: "
                                                   "comma-separated bm25, kb-base, kb-finetuned, kb-finetuned+bm25 "
                                                   "(the hybrid), or 'all'.")
                            ] = "kb-finetuned",
    config_file: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Recall@1/5/10, MRR and nDCG@10 of BM25, base and fine-tuned embedders, with and without the reranker; and
    decision support per knowledge mode: support@k and shortlist recall, judged by gold next actions."""
    from knowmap.jobs.training import decision_table, evaluate_split, retrieval_table

    if split not in ("dev", "test"):
        raise KnowMapError(f"--split must be dev or test, got {split!r} (train data is what the models learnt from)")
    config = _config(config_file, data_dir)
    results = evaluate_split(config, split=split, tasks=_split_tasks(tasks) or config.scienceworld.tasks,
                             variations=variations, out=out, embedder=embedder, reranker=reranker,
                             kinds=[k for k in kinds.split(",") if k.strip()], decision=decision,
                             decision_rerank=None if rerank_modes == "all" else _rerank_modes(rerank_modes),
                             progress=lambda line: typer.echo(line, err=True))
    protocol = results.protocol
    typer.echo(retrieval_table(results))
    if results.decision is not None:
        for subset in ("all", "unseen"):
            if results.decision.subset(subset):
                typer.echo(decision_table(results.decision, subset))
        families = ", ".join(results.decision.unseen_families) or "none"
        typer.echo(f"decision support judged by gold next actions; topic families unseen in training: {families}")
    typer.echo(f"split {split}; tasks {', '.join(protocol.tasks)}; {len(protocol.episodes)} episodes")
    if protocol.unseen_tasks:
        typer.echo(f"unseen tasks (never in training data): {', '.join(protocol.unseen_tasks)}; their numbers "
                   f"are under 'unseen' in {out}")
    typer.echo(f"wrote {out} and {out.with_suffix('.png')}")


def _rerank_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    allowed = ("bm25", "kb-base", "kb-finetuned", "kb-finetuned+bm25")
    unknown = [m for m in modes if m not in allowed]
    if unknown:
        raise KnowMapError(f"unknown --rerank-modes {unknown}; allowed: {', '.join(allowed)}, or 'all'")
    return modes


def _split_tasks(tasks: str | None) -> list[str] | None:
    return [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None


# -- the LLM agent (issue 6) -----------------------------------------------------------------------------------
llm_app = typer.Typer(help="The local LLM (SmolLM2-135M-Instruct on llama.cpp's OpenAI-compatible server).",
                      no_args_is_help=True)
app.add_typer(llm_app, name="llm")


@llm_app.command("serve")
def llm_serve(
    port: Annotated[int | None, typer.Option(min=0, max=65535, help="Port on 127.0.0.1; 0 = a free one "
                                                                    "(default llm.local_port).")] = None,
    config_file: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Start the local llama.cpp server (n_ctx from llm.local_n_ctx, 2048) and print its base URL; Ctrl-C stops it."""
    import time

    from knowmap.agent.local_llm import LocalLLMServer

    config = _config(config_file, data_dir)
    llm = config.llm if port is None else config.llm.model_copy(update={"local_port": port})
    server = LocalLLMServer.from_config(llm)
    try:
        url = server.start(timeout_s=llm.local_start_timeout_s)
        typer.echo(f"base_url {url}")
        typer.echo(f"model    {server.model_alias}  ({server.model_path}, n_ctx {server.n_ctx})")
        typer.echo(f"use it:  KNOWMAP_LLM__BASE_URL={url} knowmap eval ...   (Ctrl-C stops the server)")
        while server.running:
            time.sleep(1)
        raise KnowMapError("the llama.cpp server exited")
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


@app.command("eval")
def eval_agent(
    split: Annotated[str, typer.Option(help="test (reporting) or dev (model selection).")] = "test",
    tasks: Annotated[str | None, typer.Option(help="Comma-separated tasks, or 'all'; default scienceworld.tasks.")
                     ] = None,
    variations: Annotated[int, typer.Option(min=1, help="Variations per task, from the split's start.")] = 1,
    step_limit: Annotated[int | None, typer.Option(min=1, help="Moves per episode (default scienceworld.step_limit)."
                                                   )] = None,
    modes: Annotated[str, typer.Option(help="Comma-separated knowledge modes: none (few-shot baseline), kb-base, "
                                            "kb-finetuned.")] = "none,kb-base,kb-finetuned",
    workers: Annotated[int | None, typer.Option(min=1, help="Agent actors in the rollout pool.")] = None,
    out: Annotated[Path, typer.Option(help="JSON results; a bar chart is written beside it (.png).")] = Path(
        "agent_eval.json"),
    config_file: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Score the LLM agent per task and mode on held-out variations, with the exact protocol and tokens used.

    The LLM is llm.base_url (any OpenAI-compatible endpoint); when it is empty, the local SmolLM2 server is started
    for the run and stopped afterwards.
    """
    from tqdm import tqdm

    from knowmap.jobs.agent_eval import agent_table, evaluate_agent, protocol_lines

    config = _config(config_file, data_dir)
    bar = tqdm(total=None, unit="episode", desc="eval", file=sys.stderr)

    def progress(result: Any) -> None:
        bar.set_postfix_str(f"{result.spec.policy} {result.spec.task}/{result.spec.variation}: "
                            f"{result.final_score:g} in {result.steps} steps" + ("" if result.ok else " (failed)"))
        bar.update(1)

    try:
        report = evaluate_agent(config, split=split, tasks=_split_tasks(tasks) or config.scienceworld.tasks,
                                variations=variations, step_limit=step_limit,
                                modes=[m.strip() for m in modes.split(",") if m.strip()], num_workers=workers,
                                out=out, on_result=progress)
    finally:
        bar.close()
    typer.echo(agent_table(report))
    typer.echo(protocol_lines(report))
    typer.echo(f"wrote {out} and {out.with_suffix('.png')}")


@app.command("serve")
def serve_command(
    embedder: Annotated[str | None, typer.Option(help="Embedder model dir; default models.embedder, else the newest "
                                                      "from `knowmap train`, else the packaged MiniLM.")] = None,
    reranker: Annotated[str | None, typer.Option(help="Reranker model dir; default models.reranker, else the newest "
                                                      "from `knowmap train`, else none; '' = none.")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (default serve.host, 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="Port (default serve.port).")] = None,
    detach: Annotated[bool, typer.Option(help="Return once the service runs (only with ray.address set: a local "
                                              "Ray ends with this command).")] = False,
    retrain: Annotated[bool, typer.Option(help="Also retrain beside the service: every retrain.every new "
                                               "trajectories (contributed ones included), promote and hot-swap if "
                                               "better.")] = False,
    config_file: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Start the retrieval API on Ray Serve, or hot-swap the models of the one already running on the cluster."""
    import time

    from ray import serve

    from knowmap.jobs.session import ray_session
    from knowmap.serve.app import APP_NAME, start_service, swap_models

    config = _config(config_file, data_dir)
    if host is not None:
        config.serve.host = host
    if port is not None:
        config.serve.port = port
    if detach and not config.ray.address:
        raise KnowMapError("--detach needs a cluster (ray.address, e.g. KNOWMAP_RAY__ADDRESS=auto): a local Ray "
                           "stops when this command ends")
    with ray_session(config, serving=True):
        if config.ray.address and APP_NAME in serve.status().applications:
            result = swap_models(config, embedder=embedder, reranker=reranker)
            typer.echo(f"swapped in {result['seconds']:.1f} s: embedder {result['embedder']['version']}, "
                       f"reranker {(result['reranker'] or {}).get('version', 'none')}")
            return
        info = start_service(config, embedder=embedder, reranker=reranker)
        _print_service(info)
        watcher = _start_retraining(config, detach) if retrain else None
        if detach:
            return
        typer.echo("Ctrl-C stops the service")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            if watcher is not None:
                watcher.stop()
            serve.shutdown()


def _start_retraining(config: KnowMapConfig, detach: bool) -> Any:
    """The retrain controller beside the service: the detached actor (``--detach``) or a thread of this command."""
    import threading

    from knowmap.jobs.retrain import RetrainController, get_retrain_controller

    if detach:
        get_retrain_controller(config, watching=True).status.remote()
        typer.echo(f"retraining     every {config.retrain.every} new trajectories (the detached controller actor)")
        return None
    controller = RetrainController(config)
    threading.Thread(target=controller.watch, name="retrain-watch", daemon=True).start()
    typer.echo(f"retraining     every {config.retrain.every} new trajectories; `knowmap retrain status` shows them")
    return controller


def _print_service(info: Any) -> None:
    typer.echo(f"retrieval API  {info.url}/v1   (OpenAPI docs {info.docs_url}, health {info.url}/healthz)")
    typer.echo(f"API key        {info.key_file or 'serve.api_keys'}  (send `Authorization: Bearer <key>`)")
    typer.echo(f"embedder       {info.embedder or 'packaged all-MiniLM-L6-v2'}")
    typer.echo(f"reranker       {info.reranker or 'none'}")


@app.command("run")
def run_command(
    quick: Annotated[bool, typer.Option("--quick", help="About 10 minutes on 2 cores: 2 short tasks, 1 epoch, "
                                                        "10-step agents.")] = False,
    tasks: Annotated[str | None, typer.Option(help="Comma-separated ScienceWorld tasks, or 'all' for all 30.")] = None,
    variations: Annotated[int | None, typer.Option(min=1, help="Train variations per task.")] = None,
    agent_variations: Annotated[int, typer.Option(min=1, help="Dev variations per task for agent rollouts.")] = 1,
    modes: Annotated[str, typer.Option(help="Knowledge modes of the agent rounds.")] = "none,kb-base,kb-finetuned",
    workers: Annotated[int | None, typer.Option(min=1, help="Agent actors; default one per core.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show Ray's, Serve's and the models' logs here "
                                                            "instead of only in the log file.")] = False,
    config_file: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """The main job: expert KBs, retriever training and evaluation, the Serve API, LLM-agent rollouts that feed
    the KBs, one retrain cycle, and a report (Markdown + plots) in <data_dir>/report."""
    import time

    from knowmap.jobs.console import Console
    from knowmap.jobs.main_job import RunOptions, run_main_job

    sw: dict[str, Any] = {}
    if tasks is not None:
        sw["tasks"] = _split_tasks(tasks)
    if variations is not None:
        sw["variations"] = variations
    config = _config(config_file, data_dir, sw)
    options = RunOptions(preset="quick" if quick else "full", agent_variations=agent_variations,
                         modes=[m.strip() for m in modes.split(",") if m.strip()], workers=workers)
    log_file = config.paths.logs / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    if not verbose:
        typer.echo(f"log     {log_file}  (Ray, Serve and model logs; --verbose shows them here)")
    with Console(log_file, verbose=verbose) as console:
        report, _ = run_main_job(config, options, console)
    if report.errors:
        typer.echo("the run had errors (listed in the report):\n  " + "\n  ".join(report.errors), err=True)
        raise typer.Exit(1)


app.add_typer(retrain_app, name="retrain")
app.add_typer(env_app, name="env")
app.add_typer(milvus_app, name="milvus")
app.add_typer(keys_app, name="keys")
app.command("export-sft")(export_sft_command)
app.command("mcp")(mcp_command)


@app.command("config")
def show_config(config_file: ConfigOption = None, data_dir: DataDirOption = None,
                ray_env: Annotated[bool, typer.Option("--ray-env", help="print instead, as shell exports, the "
                                                     "environment a Ray node needs before `ray start`: the "
                                                     "service's frontend and connection timeouts")] = False) -> None:
    """Print the configuration in force (defaults, file, KNOWMAP_* env vars) as JSON."""
    config = _config(config_file, data_dir)
    if ray_env:
        import shlex

        from knowmap.serve.proxy import proxy_environment

        for name, value in sorted(proxy_environment(config).items()):
            typer.echo(f"export {name}={shlex.quote(value)}")
        return
    typer.echo(json.dumps(config.model_dump(mode="json"), indent=2))


def main() -> None:
    """Entry point of the ``knowmap`` console script: known errors end with one line and exit code 2."""
    try:
        app()
    except KnowMapError as e:
        typer.echo(f"error: {e}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
