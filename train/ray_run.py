"""Data-parallel training on Ray Train: one ``TorchTrainer`` run per call, resumable, with per-epoch checkpoints.

The driver (:func:`fit`) turns pairs into examples, starts ``num_workers`` workers (CPU + gloo here, GPU + nccl on
a cluster), and copies the last checkpoint's model to ``output_dir`` with a ``knowmap_model.json``. Each worker
(:func:`worker_loop`) runs the plain loop of :mod:`knowmap.train.loop`:

- the loss module, which holds the model, is wrapped for DDP by ``ray.train.torch.prepare_model``, so gradients
  are all-reduced in ``backward``;
- a seeded ``DistributedSampler`` gives each worker a disjoint share; the configured batch size is global;
- after every epoch all workers call ``ray.train.report`` (it is a barrier in Ray Train V2) and rank 0 alone
  attaches a checkpoint: the model in its library's format, optimiser + scheduler state, and the history;
- a run started again with the same output dir finds its checkpoints under the same ``RunConfig(name,
  storage_path)``; ``ray.train.get_checkpoint()`` returns the latest and training continues after its epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.fs
from ray.train import UserCallback

from knowmap.config import TrainingConfig
from knowmap.errors import TrainingError
from knowmap.models.embedder import model_fingerprint
from knowmap.schemas import TrainingPair
from knowmap.train.loop import (
    MODEL_DIR,
    TrainingTask,
    load_state,
    make_loader,
    make_optimizer,
    read_state,
    run_epoch,
    save_state,
    seed_everything,
    set_epoch,
    set_threads,
)

METADATA_FILE = "knowmap_model.json"
RUN_IDENTITY_FILE = "knowmap_run.json"
DDP_OPTIONS = {"forward_sync_buffers": False, "gradient_as_bucket_view": True}
MAX_STEP_LOSSES = 200  # about this many per epoch in the history (rank 0's own steps), for a loss curve
_FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "SENTENCE_TRANSFORMERS_HOME")

EpochCallback = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    """What a training call produced.

    Attributes:
        model_dir: the final model, loadable by path (sentence-transformers or CrossEncoder format).
        metadata: the contents of ``knowmap_model.json`` in ``model_dir``.
        history: one metrics dict per epoch, including epochs trained by earlier (resumed) calls.
        epochs_run: epochs this call trained (0 when the checkpoints already covered every epoch).
        checkpoint_path: where the run's checkpoints live (``<storage_path>/<name>``).
    """

    model_dir: str
    metadata: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    epochs_run: int = 0
    checkpoint_path: str = ""


def pairs_hash(pairs: Sequence[TrainingPair]) -> str:
    """A sha256 over the pairs' canonical JSON, in order (the order decides batches, so it is part of the data)."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(json.dumps(pair.model_dump(mode="json"), sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def run_location(output_dir: str | Path, config: TrainingConfig) -> tuple[str, str]:
    """Where a run for ``output_dir`` keeps its checkpoints: ``(storage_path, name)`` for ``RunConfig``.

    The default storage is the output dir's parent; the name is ``<output dir name>.ray-train``, so the same
    output dir always maps to the same run and a restarted call resumes it.
    """
    output = Path(output_dir).expanduser().absolute()
    storage = config.storage_path or str(output.parent)
    if "://" not in storage:
        storage = str(Path(storage).expanduser().absolute())
    return storage, f"{output.name}.ray-train"


def fit(task: TrainingTask, pairs: Sequence[TrainingPair], *, base_model: str, output_dir: str,
        config: TrainingConfig, resume: bool = True, on_epoch: EpochCallback | None = None) -> TrainResult:
    """Train ``task`` on ``pairs`` with Ray Train and write the final model to ``output_dir``.

    Args:
        task: what to train (see :class:`~knowmap.train.loop.TrainingTask`).
        pairs: the training pairs (train split only).
        base_model: local model directory to start from (a ``str``; Ray workers load it by path).
        output_dir: where the final model goes; must be new, empty, or a model an earlier call wrote.
        config: the ``training`` config section.
        resume: continue from the last checkpoint of this output dir's run; False discards it and starts over.
            A run never goes back: with fewer ``epochs`` than its checkpoints hold, the latest is exported.
        on_epoch: called on this (driver) process with each epoch's metrics as soon as the epoch is reported.

    Returns:
        a :class:`TrainResult`.

    Raises:
        ValueError: ``pairs`` is empty.
        TrainingError: ``output_dir`` holds something else, a checkpoint to resume was made from other data or
            another base model, or the workers failed (the cause is chained).
    """
    if not pairs:
        raise ValueError("no training pairs: build them from train-split trajectories first")
    base_model, output = str(base_model), Path(output_dir).expanduser().absolute()
    _check_output_dir(output)
    storage, name = run_location(output, config)
    # An optimiser state saved with other trainable parameters cannot be resumed.
    identity = {"kind": task.kind, "base_model": base_model, "data_hash": pairs_hash(pairs),
                "freeze_word_embeddings": config.freeze_word_embeddings}
    _prepare_run(storage, name, identity, resume)
    run_id = uuid.uuid4().hex
    checkpoint = _latest_checkpoint(f"{storage}/{name}") if resume else None
    if checkpoint is None or _checkpoint_epoch(checkpoint) < config.epochs:
        # Otherwise every epoch asked for is done already: export it without starting workers.
        checkpoint = _train(task, pairs, base_model=base_model, config=config, storage=storage, name=name,
                            identity=identity, run_id=run_id, on_epoch=on_epoch)
    with checkpoint.as_directory() as ckpt:
        state = read_state(ckpt)
        _replace_dir(Path(ckpt) / MODEL_DIR, output)
    if hasattr(task, "finish"):
        task.finish(str(output), base_model, config)
    history = state["history"]
    metadata = write_metadata(output, kind=task.kind, base_model=base_model, data_hash=identity["data_hash"],
                              num_pairs=len(pairs), epochs=state["epoch"], history=history, config=config)
    return TrainResult(model_dir=str(output), metadata=metadata, history=history,
                       epochs_run=sum(1 for h in history if h.get("run_id") == run_id),
                       checkpoint_path=f"{storage}/{name}")


def _train(task: TrainingTask, pairs: Sequence[TrainingPair], *, base_model: str, config: TrainingConfig,
           storage: str, name: str, identity: dict[str, Any], run_id: str, on_epoch: EpochCallback | None) -> Any:
    """One ``TorchTrainer.fit()``; returns the run's latest checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    queue = None
    if on_epoch is not None:
        from ray.util.queue import Queue

        queue = Queue(actor_options={"num_cpus": 0})  # 0 CPUs: the workers may hold every core
    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"task": task, "examples": task.examples(pairs, config), "base_model": base_model,
                           "training": config.model_dump(), "run_id": run_id, "identity": identity},
        torch_config=TorchConfig(backend=config.backend),
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker,
                                                           **config.worker_resources}),
        run_config=RunConfig(
            name=name, storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=config.max_failures),
            callbacks=[_EpochForwarder(queue)] if queue is not None else None,
            worker_runtime_env={"env_vars": env} if env else None,
        ),
    )
    try:
        result = _fit_forwarding(trainer, queue, on_epoch)
    except Exception as e:  # noqa: BLE001 - Ray wraps worker errors in several types; all mean the run failed
        raise TrainingError(f"{task.kind} training failed: {e}. Checkpoints so far are kept under "
                            f"{storage}/{name}; call again with resume=True to continue") from e
    finally:
        if queue is not None:
            queue.shutdown()
    if result.checkpoint is None:
        raise TrainingError(f"the {task.kind} run under {storage}/{name} reported no checkpoint")
    return result.checkpoint


def _latest_checkpoint(run_path: str) -> Any:
    """The latest checkpoint of an earlier run at ``run_path``, or None where there is none."""
    from ray.train import Result

    try:
        return Result.from_path(run_path).checkpoint
    except RuntimeError:  # no run folder, or no checkpoint-manager snapshot in it yet
        return None


def _checkpoint_epoch(checkpoint: Any) -> int:
    with checkpoint.as_directory() as ckpt:
        return int(read_state(ckpt)["epoch"])


def worker_loop(loop_config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs: resume or start, then train, report and checkpoint each epoch."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    task: TrainingTask = loop_config["task"]
    config = TrainingConfig.model_validate(loop_config["training"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    set_threads(config.cpus_per_worker)
    device = ray.train.torch.get_device()

    seed_everything(config.seed)  # a new head is initialised alike everywhere (DDP also broadcasts rank 0's)
    checkpoint = ray.train.get_checkpoint()
    state, tensors = None, None
    if checkpoint is None:
        model, loss = task.build(loop_config["base_model"], config, device)
    else:
        with checkpoint.as_directory() as ckpt:
            model, loss = task.build(os.path.join(ckpt, MODEL_DIR), config, device)
            state, tensors = load_state(ckpt)
    loader = make_loader(loop_config["examples"], task.collate(model, config),
                         batch_size=config.batch_size // world, seed=config.seed, rank=rank, world_size=world,
                         distinct_columns=getattr(task, "distinct_columns", ()))
    # DDP over the loss module that holds the model. Buffers (position ids) never change, so they need no
    # sync at every forward; unused parameters were frozen by the task, so no graph search per step; gradients
    # live in the all-reduce buckets, which saves a copy of every gradient per step.
    wrapped = ray.train.torch.prepare_model(loss, parallel_strategy_kwargs=dict(DDP_OPTIONS))
    optimizer, scheduler = make_optimizer(wrapped, config, total_steps=len(loader) * config.epochs)
    start_epoch, history = 0, []
    if state is not None:
        optimizer.load_state_dict(tensors["optimizer"])
        scheduler.load_state_dict(tensors["scheduler"])
        start_epoch, history = int(state["epoch"]), list(state["history"])

    for epoch in range(start_epoch, config.epochs):
        set_epoch(loader, epoch)
        seed_everything(config.seed + 7919 * (epoch + 1) + rank)  # dropout: the same stream after a resume
        stats = run_epoch(wrapped, loader, optimizer, scheduler, device=device, max_grad_norm=config.max_grad_norm)
        totals = [stats.loss * stats.steps, stats.steps, stats.samples, stats.timed_samples]
        seconds = [stats.seconds, stats.timed_seconds]
        if world > 1:
            totals = _all_reduce(totals, dist.ReduceOp.SUM, device)
            seconds = _all_reduce(seconds, dist.ReduceOp.MAX, device)
        record = {"epoch": epoch + 1, "loss": totals[0] / max(1.0, totals[1]), "steps": int(stats.steps),
                  "samples": int(totals[2]), "seconds": seconds[0],
                  "samples_per_s": totals[3] / seconds[1] if seconds[1] > 0 else 0.0,
                  "lr": float(scheduler.get_last_lr()[0]), "workers": world, "run_id": loop_config["run_id"],
                  "step_losses": stats.step_losses[:: max(1, len(stats.step_losses) // MAX_STEP_LOSSES)]}
        history.append(record)
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                task.save(model, os.path.join(tmp, MODEL_DIR))
                save_state(tmp, optimizer=optimizer, scheduler=scheduler,
                           state={"epoch": epoch + 1, "history": history, **loop_config["identity"]})
                ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"epoch_{epoch + 1:04d}")
        else:
            ray.train.report(record, checkpoint=None)  # every rank reports: it is a barrier


def _all_reduce(values: list[float], op: Any, device: Any) -> list[float]:
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)  # on the GPU for nccl
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def write_metadata(model_dir: str | Path, *, kind: str, base_model: str, data_hash: str, num_pairs: int,
                   epochs: int, history: list[dict[str, Any]], config: TrainingConfig) -> dict[str, Any]:
    """Write ``knowmap_model.json`` into a finished model directory and return what was written.

    ``version`` is :func:`~knowmap.models.embedder.model_fingerprint` of the model files, taken before this file exists.
    """
    metadata = {
        "kind": kind,
        "version": model_fingerprint(str(model_dir)),
        "base_model": base_model,
        "base_model_version": model_fingerprint(base_model),
        "data_hash": data_hash,
        "num_pairs": num_pairs,
        "epochs": epochs,
        "metrics": history[-1] if history else {},
        "history": history,
        "training": config.model_dump(),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (Path(model_dir) / METADATA_FILE).write_text(json.dumps(metadata, indent=1, sort_keys=True))
    return metadata


def read_metadata(model_dir: str | Path) -> dict[str, Any]:
    """The ``knowmap_model.json`` of a trained model.

    Raises:
        TrainingError: the directory has none (it was not written by a KnowMap trainer).
    """
    path = Path(model_dir) / METADATA_FILE
    if not path.is_file():
        raise TrainingError(f"{model_dir} has no {METADATA_FILE}; pass a directory that a KnowMap trainer wrote")
    return json.loads(path.read_text())


class _EpochForwarder(UserCallback):
    """A Ray Train callback (it runs in the controller actor) that puts rank 0's metrics on a queue."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        self.queue.put(dict(metrics[0]))

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        return None


def _fit_forwarding(trainer: Any, queue: Any, on_epoch: EpochCallback | None) -> Any:
    """``trainer.fit()``; with a callback, fit runs in a thread while this thread hands each epoch to it."""
    if queue is None or on_epoch is None:
        return trainer.fit()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread below
            outcome["error"] = e

    from ray.util.queue import Empty

    thread = threading.Thread(target=run, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive() or not queue.empty():
        try:
            metrics = queue.get(timeout=0.5)
        except Empty:  # raised wrapped in a RayTaskError, which is also an Empty
            continue
        on_epoch(metrics)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _check_output_dir(output: Path) -> None:
    if output.exists() and (not output.is_dir() or (any(output.iterdir())
                                                    and not (output / METADATA_FILE).is_file())):
        raise TrainingError(f"output_dir {output} exists and is not a model a KnowMap trainer wrote; "
                            "pass a new or empty directory")


def _prepare_run(storage: str, name: str, identity: dict[str, Any], resume: bool) -> None:
    """Start over (``resume=False``) or check that the run to resume was made from the same data and model."""
    fs, root = pyarrow.fs.FileSystem.from_uri(storage)
    run_dir = f"{root.rstrip('/')}/{name}"
    info = fs.get_file_info(run_dir)
    if info.type != pyarrow.fs.FileType.NotFound and not resume:
        fs.delete_dir(run_dir)
    marker = f"{run_dir}/{RUN_IDENTITY_FILE}"
    if resume and fs.get_file_info(marker).type == pyarrow.fs.FileType.File:
        with fs.open_input_stream(marker) as f:
            previous = json.loads(f.read().decode())
        changed = sorted(k for k in identity if previous.get(k) != identity[k])
        if changed:
            raise TrainingError(f"the checkpoints under {storage}/{name} were made with another {', '.join(changed)}"
                                f" ({previous}); pass resume=False to start over, or another output_dir")
    fs.create_dir(run_dir, recursive=True)
    with fs.open_output_stream(marker) as f:
        f.write(json.dumps(identity, indent=1, sort_keys=True).encode())


def _replace_dir(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` through a sibling temp dir and a rename, so a crash leaves no half model."""
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    shutil.copytree(source, staging)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
