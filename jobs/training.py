"""The retriever jobs behind ``knowmap train`` and ``knowmap eval-retrieval``.

``train_retriever``: train-split episodes -> KnowMap pairs (base embedder) -> InfoNCE embedder and listwise reranker on
Ray Train -> models under ``<data_dir>/models`` (recorded in ``models/latest.json``) with loss curves and the
pair counts under ``<data_dir>/training``.

``evaluate_split``: a dev or test split's episodes -> Recall@k, MRR, nDCG@10 for BM25, the base and the
fine-tuned embedder, each with and without the reranker -> JSON and a bar chart.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from knowmap.config import KnowMapConfig
from knowmap.environment.episodes import Episode, collect_episodes, load_episodes
from knowmap.errors import KnowMapError
from knowmap.models import registry
from knowmap.models.embedder import Embedder, default_embedder_path
from knowmap.results import DecisionEvaluation, RetrievalEvaluation, TrainedModel, TrainingReport


def episode_cache(config: KnowMapConfig) -> Path:
    return config.paths.episode_cache


def train_episodes(config: KnowMapConfig, tasks: Sequence[str] | None, variations: int | None) -> list[Episode]:
    """Train-split episodes: those build-kb stored (no tasks given), else gold replays of ``tasks`` (cached)."""
    if tasks is None and config.paths.trajectories.is_dir():
        episodes = load_episodes(config.paths.trajectories, "train")
        if episodes:
            return episodes
    sw = config.scienceworld
    return collect_episodes(list(tasks or sw.tasks), "train", variations or sw.variations,
                            cache_dir=episode_cache(config), step_limit=sw.step_limit,
                            simplifications=sw.simplifications, java_heap=sw.java_heap)


def train_retriever(config: KnowMapConfig, *, tasks: Sequence[str] | None = None, variations: int | None = None,
                    reranker: bool = True, on_epoch: Callable[[str, dict[str, Any]], None] | None = None,
                    episodes: Sequence[Episode] | None = None, record_latest: bool = True,
                    out_dir: Path | None = None, tag: str = "", splits: Sequence[str] = ("train",),
                    select: bool | None = None, start_embedder: str = "", start_reranker: str = "",
                    ) -> TrainingReport:
    """Build pairs from train-split episodes and fine-tune the embedder (and the reranker) on Ray Train.

    Args:
        episodes: train on these (the retrain controller passes expert and agent episodes); default: the
            train-split episodes of :func:`train_episodes`.
        record_latest: point ``models/latest.json`` at the new models (the retrain controller does that itself,
            and only for a model it promotes).
        out_dir: the folder for pairs, loss curves and the report; default ``config.paths.training``.
        splits: the splits ``episodes`` may come from (see :func:`build_pairs`).
        tag: appended to the model dirs (``embedder-<data hash>-<tag>``), so that two models trained on the same
            data with other settings (the retrain controller's cycles) never share a dir or its checkpoints.
        select: choose the embedder's mix with the base model on the dev split (:func:`select_on_dev`, among
            ``training.select_weights``, on ``training.select_variations`` dev variations of the training tasks)
            instead of taking ``training.finetuned_weight``; default: when ``training.select_variations`` > 0. The
            retrain controller passes False: its gate judges on dev, and must not judge what dev chose.
        start_embedder, start_reranker: warm start: fine-tune these models (the serving ones) instead of the base
            model; pairs are still built with the base model. Empty = from the base model.

    Returns:
        the :class:`~knowmap.results.TrainingReport` written to ``<out_dir>/report.json``: pair counts,
        model dirs, loss histories.

    Raises:
        KnowMapError: no train-split episodes, or no pairs could be built from them.
    """
    from knowmap.jobs.session import ray_session
    from knowmap.train.embedder_trainer import plot_loss, train_embedder
    from knowmap.train.pairs import build_pairs
    from knowmap.train.reranker_trainer import train_reranker

    episodes = list(episodes) if episodes is not None else train_episodes(config, tasks, variations)
    if not episodes:
        raise KnowMapError("no train-split episodes: run `knowmap build-kb --split train` first, or pass --tasks")
    base_path = config.models.embedder or default_embedder_path()
    base = Embedder(base_path, device=config.models.device, batch_size=config.models.batch_size)
    pairset = build_pairs(episodes, base, theta=config.training.theta, splits=splits,
                          max_negatives=max(1, config.training.max_negatives), seed=config.training.seed)
    pairs = pairset.pairs()
    if not pairs:
        raise KnowMapError(f"no training pairs from {len(episodes)} episodes; add tasks or variations")
    out = out_dir or config.paths.training
    out.mkdir(parents=True, exist_ok=True)
    (out / "pairs.json").write_text(json.dumps(pairset.to_dict()))
    models = config.paths.models
    suffix = pairset.data_hash[:12] + (f"-{tag}" if tag else "")
    select = config.training.select_variations > 0 if select is None else select
    # Selecting: train the plain fine-tuned model; the mixes are made from it.
    training = config.training.model_copy(update={"finetuned_weight": 1.0}) if select else config.training
    with ray_session(config):
        emb = train_embedder(pairs, base_model=start_embedder or str(base_path),
                             output_dir=str(models / f"embedder-{suffix}"), config=training,
                             on_epoch=(lambda m: on_epoch("embedder", m)) if on_epoch else None)
        plot_loss(emb.history, out / "loss_embedder.png")
        trained_reranker = None
        if reranker:
            # The same pairs with as many hard negatives as the reranker's listwise loss takes (same seed, so the
            # same queries and positives); the embedder keeps its own max_negatives.
            rerank_pairs = build_pairs(episodes, base, theta=config.training.theta, splits=splits,
                                       max_negatives=config.training.reranker_negatives,
                                       seed=config.training.seed).pairs()
            rer = train_reranker(rerank_pairs, base_model=start_reranker or str(config.models.reranker or base_path),
                                 output_dir=str(models / f"reranker-{suffix}"), config=config.training,
                                 on_epoch=(lambda m: on_epoch("reranker", m)) if on_epoch else None)
            plot_loss(rer.history, out / "loss_reranker.png")
            trained_reranker = TrainedModel(model_dir=rer.model_dir, history=rer.history, epochs_run=rer.epochs_run)
    train_tasks = sorted({e.task for e in episodes})
    chosen, selection = emb.model_dir, None
    if select:
        chosen, selection = select_on_dev(config, emb.model_dir, tasks=train_tasks,
                                          variations=max(1, config.training.select_variations),
                                          weights=config.training.select_weights)
    report = TrainingReport(
        episodes=len(episodes), train_tasks=train_tasks, pairs=pairset.counts, data_hash=pairset.data_hash,
        embedder=TrainedModel(model_dir=chosen, history=emb.history, epochs_run=emb.epochs_run),
        reranker=trained_reranker, selection=selection,
    )
    (out / "report.json").write_text(json.dumps(report.model_dump(mode="json"), indent=2))
    if record_latest:
        registry.record_latest(config.paths, report.embedder.model_dir, report.reranker_dir, report.train_tasks)
    return report


def evaluate_split(config: KnowMapConfig, *, split: str, tasks: Sequence[str], variations: int,
                   out: Path, embedder: str = "", reranker: str = "",
                   kinds: Sequence[str] = ("env", "experience"), decision: bool = True,
                   decision_rerank: Sequence[str] | None = ("kb-finetuned",),
                   progress: Callable[[str], None] | None = None) -> RetrievalEvaluation:
    """Evaluate retrieval on ``split`` (dev or test) for BM25, base, fine-tuned, each with and without reranker.

    Args:
        embedder, reranker: model dirs; empty = the newest from ``knowmap train`` (``models/latest.json``), if any.
        out: the JSON to write; a bar chart is written beside it (``.png``).
        decision: also run the decision-support evaluation (:func:`decision_support`; its results go under
            ``decision``): the experiential KB is the train-split sub-goals of the tasks the model was trained on
            (``scienceworld.tasks`` where no model was trained).
        decision_rerank: the knowledge modes the decision evaluation also runs ``+rerank`` (None: all); the
            cross-encoder reads ~50 pairs/s on 2 cores, so by default only the served pipeline, kb-finetuned.

    Returns:
        the evaluation, with the evaluated model dirs and ``variations`` recorded in its protocol.

    Raises:
        KnowMapError: ``split`` is train (evaluation is on held-out data).
    """
    from knowmap.evaluation.retrieval import evaluate_retrieval, plot_metrics
    from knowmap.models.reranker import Reranker

    if split == "train":
        raise KnowMapError("evaluate on held-out data: --split dev (model selection) or test (reporting), not train")
    latest = registry.read_latest(config.paths)
    embedder = embedder or latest.embedder
    reranker = reranker or latest.reranker
    sw = config.scienceworld
    episodes = collect_episodes(list(tasks), split, variations, cache_dir=episode_cache(config),
                                step_limit=sw.step_limit, simplifications=sw.simplifications, java_heap=sw.java_heap)
    systems = {"base": Embedder(config.models.embedder or default_embedder_path(), device=config.models.device)}
    if embedder:
        systems["finetuned"] = Embedder(embedder, device=config.models.device)
    results = evaluate_retrieval(episodes, embedders=systems, reranker=Reranker(reranker) if reranker else None,
                                 kinds=kinds, train_tasks=latest.train_tasks,
                                 theta=config.training.theta, settings=config.retrieval)
    results.protocol.record_models(embedder=embedder or None, reranker=reranker or None, variations=variations)
    if decision:
        modes = {"kb-base": config.models.embedder, **({"kb-finetuned": embedder} if embedder else {})}
        results.decision = decision_support(config, split=split, tasks=tasks, variations=variations,
                                            train_tasks=latest.train_tasks or sw.tasks, embedders=modes,
                                            reranker=reranker, rerank_modes=decision_rerank,
                                            hybrid_modes=["kb-finetuned"] if embedder else [], progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results.model_dump(mode="json"), indent=2))
    plot_metrics(results, out.with_suffix(".png"))
    return results


def decision_support(config: KnowMapConfig, *, split: str, tasks: Sequence[str], variations: int,
                     train_tasks: Sequence[str], train_variations: int | None = None,
                     embedders: dict[str, str], reranker: str = "",
                     rerank_modes: Sequence[str] | None = None, hybrid_modes: Sequence[str] = (),
                     protocol: dict[str, Any] | None = None,
                     progress: Callable[[str], None] | None = None) -> DecisionEvaluation:
    """The decision-support evaluation (:mod:`knowmap.evaluation.decision`) of ``split`` (dev or test).

    Held-out: the first ``variations`` of the split for each of ``tasks``; the experiential KB: the train-split
    sub-goals of ``train_tasks`` (``train_variations``, default ``scienceworld.variations``). Both are annotated
    gold replays, cached under ``<data_dir>/episode_cache``.

    Args:
        embedders: mode name -> embedder dir (empty: the packaged MiniLM), e.g. ``{"kb-base": "", ...}``.
        reranker: a reranker dir; retrieving modes (those of ``rerank_modes``, default all) are then also run
            ``+rerank``. Every mode ranks through the served pipeline with ``config.retrieval``.
        hybrid_modes: names of ``embedders`` also run hybrid (``NAME+bm25``).

    Raises:
        KnowMapError: ``split`` is train, or no train task to build the experiential KB from.
    """
    from knowmap.environment.sciworld import task_topics
    from knowmap.evaluation.decision import decision_steps, evaluate_decision, experience_corpus
    from knowmap.models.reranker import Reranker

    if split == "train":
        raise KnowMapError("decision support is judged on held-out data: --split dev or test, not train")
    if not train_tasks:
        raise KnowMapError("decision support needs the training tasks (their train-split sub-goals are the "
                           "experiential KB); train a model first or name them")
    sw = config.scienceworld
    say = progress or (lambda line: None)

    def episodes(which: Sequence[str], on: str, count: int) -> list[Episode]:
        say(f"decision support: annotated gold replays of {len(which)} tasks x {count} {on} variations")
        return collect_episodes(list(which), on, count, cache_dir=episode_cache(config), step_limit=sw.step_limit,
                                simplifications=sw.simplifications, java_heap=sw.java_heap, annotate=True)

    held = episodes(tasks, split, variations)
    train = episodes(train_tasks, "train", train_variations or sw.variations)
    topics = task_topics()
    record = {"split": split, "tasks": sorted(tasks), "variations": variations, "train_split": "train",
              "train_variations": train_variations or sw.variations, "episodes": sorted(e.episode_id for e in held),
              "families": sorted({topics.get(t, t) for t in tasks}), "step_limit": sw.step_limit,
              "simplifications": sw.simplifications, "scienceworld": _package_version("scienceworld"),
              "embedders": embedders, "reranker": reranker or None, **(protocol or {})}
    models = {name: Embedder(path or default_embedder_path(), device=config.models.device)
              for name, path in embedders.items()}
    return evaluate_decision(
        decision_steps(held, recent_window=config.agent.history_window), experience_corpus(train),
        embedders=models, reranker=Reranker(reranker) if reranker else None,
        rerank_modes=rerank_modes, hybrid_modes=hybrid_modes, settings=config.retrieval,
        k_env=config.agent.k_env, k_experience=config.agent.k_experience, shortlist_size=config.agent.shortlist,
        train_tasks=train_tasks, protocol=record, progress=progress)


def select_on_dev(config: KnowMapConfig, raw_embedder: str, *, tasks: Sequence[str], variations: int,
                  weights: Sequence[float], train_variations: int | None = None,
                  progress: Callable[[str], None] | None = None) -> tuple[str, dict[str, Any]]:
    """Choose the fine-tuned embedder's weight-space mix with the base model (WiSE-FT) on the dev split.

    Each weight in ``weights`` gives a candidate (``<raw_embedder>-w<weight>``; weight 1 is the raw fine-tuned
    model); each is judged by decision support on the first ``variations`` dev variations of ``tasks`` (the
    training tasks: no other family is looked at before a test report), by shortlist recall@k, then experience
    and env support. Nothing is judged by an embedder.

    Returns:
        the chosen embedder dir and the selection record (every candidate's dev metrics, the chosen weight).
    """
    import shutil

    from knowmap.train.embedder_trainer import interpolate_weights

    base = config.models.embedder or default_embedder_path()
    candidates: dict[str, str] = {}
    for weight in weights:
        path = raw_embedder if weight == 1 else f"{raw_embedder}-w{weight:g}"
        if weight != 1 and not Path(path).is_dir():
            shutil.copytree(raw_embedder, path + ".tmp", dirs_exist_ok=True)
            interpolate_weights(path + ".tmp", base, weight)
            Path(path + ".tmp").rename(path)
        candidates[f"w{weight:g}"] = path
    results = decision_support(config, split="dev", tasks=tasks, variations=variations, train_tasks=tasks,
                               train_variations=train_variations, embedders=candidates, progress=progress)
    agent = config.agent
    criterion = [f"shortlist_recall@{agent.shortlist}", f"support@{agent.k_experience}_experience",
                 f"support@{agent.k_env}_env"]
    chosen = max(candidates, key=lambda name: [results.metric(name, m) or 0.0 for m in criterion])  # ties: first
    return candidates[chosen], {"criterion": criterion, "split": "dev", "tasks": sorted(tasks),
                                "variations": variations, "candidates": candidates, "chosen": chosen,
                                "dev": {name: results.modes.get(name, {}) for name in candidates},
                                "dev_none": results.modes.get("none", {}), "dev_bm25": results.modes.get("bm25", {})}


def decision_table(results: DecisionEvaluation, subset: str = "all") -> str:
    """A plain-text table of a decision-support evaluation: one row per knowledge mode."""
    modes = results.subset(subset) or {}
    names = sorted({k for m in modes.values() for k in m if not k.startswith("steps")},
                   key=lambda k: (not k.startswith("shortlist"), k))
    lines = [f"{'mode (' + subset + ')':<22}" + "".join(f"{n:>22}" for n in names) + f"{'steps':>7}"]
    for mode, values in modes.items():
        cells = "".join(f"{values[n]:>22.3f}" if n in values else f"{'-':>22}" for n in names)
        lines.append(f"{mode:<22}{cells}{int(values.get('steps', 0)):>7}")
    return "\n".join(lines)


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def retrieval_table(results: RetrievalEvaluation, metrics: Sequence[str] = ("recall@1", "recall@5", "recall@10", "mrr",
                                                                           "ndcg@10")) -> str:
    """A plain-text table: one row per (kind, system), one column per metric (over all queries)."""
    lines = [f"{'kind':<11} {'system':<18}" + "".join(f"{m:>10}" for m in metrics)]
    for kind, block in results.kinds.items():
        for system, report in block.systems.items():
            values = [report.metric(m) for m in metrics]
            lines.append(f"{kind:<11} {system:<18}" + "".join(f"{float('nan') if v is None else v:>10.3f}"
                                                              for v in values))
    return "\n".join(lines)
