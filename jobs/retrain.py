"""The retrain controller: retrains the retriever as experience accumulates, and promotes only a better model.

A cycle (:meth:`RetrainController.retrain`):

1. **Data.** Every stored trajectory (expert replays and agent rollouts) except the gate's held-out dev episodes and
   anything of the test split becomes training episodes; pairs are built as in ``knowmap train``.
2. **Train** a candidate embedder (and reranker) on Ray Train, from the base model, on all of that data.
3. **Gate.** Candidate and serving embedder are judged on the same held-out dev episodes (the first
   ``retrain.gate_variations`` dev variations of each gate task) by decision support, as in
   ``knowmap eval-retrieval``: relevance comes from the gold next actions, never from an embedder
   (:mod:`knowmap.evaluation.decision`). The candidate is promoted only if its mean over the gate's metrics (shortlist
   recall@k, experience support@k, env support@k) beats the serving model's by more than ``retrain.min_gain``;
   otherwise the serving model stays and the decision records why.
4. **Promote.** The experiential KB re-embeds every row into the candidate's own collection and returns only when
   that collection is complete (searches keep answering from the old one meanwhile); then the retrieval service
   hot-swaps to the candidate, and ``models/latest.json`` points at it. The previous model and its collection are
   kept for :meth:`RetrainController.rollback`.

The state (serving and previous models, every decision) lives in ``<data_dir>/retrain/state.json``, written
atomically, and is what ``knowmap retrain status`` and ``GET /v1/models`` show. :class:`RetrainController` is a
plain class; :func:`get_retrain_controller` makes it a named, detached Ray actor that can :meth:`watch` the KB.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray

from knowmap.config import KnowMapConfig
from knowmap.errors import KnowMapError
from knowmap.models.registry import read_latest, record_latest
from knowmap.schemas import RetrainDecision, RetrainStatus, ServingModels

ACTOR_NAME = "retrain-controller"
logger = logging.getLogger(__name__)

MEAN_COSINE = "mean_cosine"  # not a metric: how alike the embedder's vectors of distinct sub-goals are
COLLAPSED_COSINE = 0.99  # above it an embedder tells texts apart by float noise only (a collapsed training run)
_COSINE_PROBE = 64  # sub-goal texts the spread is measured on
Swap = Callable[[ServingModels], None]
Reindex = Callable[[str], None]


def decide(candidate: dict[str, float], serving: dict[str, float], min_gain: float = 0.0) -> tuple[bool, str]:
    """The promotion gate: promote iff the candidate's mean over the gate's metrics beats the serving model's by
    more than ``min_gain``.

    A candidate whose vectors of distinct sub-goals have a mean cosine above ``COLLAPSED_COSINE`` is never
    promoted: it ranks by tie-breaking float noise, so its scores (fused with BM25, they can look good) say nothing.
    For the same reason a candidate that has not collapsed replaces a serving model that has.

    Args:
        candidate, serving: each decision-support metric (``shortlist_recall@12``, ``support@3_experience``,
            ``support@5_env``) on the same held-out episodes, and optionally ``MEAN_COSINE``.

    Returns:
        ``(promote, reason)``; the reason names both means and every metric's numbers.

    Raises:
        KnowMapError: the two were not measured on the same metrics, or on none.
    """
    names = sorted(k for k in candidate if k != MEAN_COSINE)
    if not names or set(candidate) != set(serving):
        raise KnowMapError(f"the gate needs both models measured on the same metrics; got candidate "
                           f"{sorted(candidate)} and serving {sorted(serving)}")
    mean_c = sum(candidate[k] for k in names) / len(names)
    mean_s = sum(serving[k] for k in names) / len(names)
    detail = ", ".join(f"{k} {candidate[k]:.3f} vs {serving[k]:.3f}" for k in names)
    if candidate.get(MEAN_COSINE, 0.0) > COLLAPSED_COSINE:
        return False, (f"kept the serving model: the candidate embedder has collapsed (mean cosine "
                       f"{candidate[MEAN_COSINE]:.4f} between distinct sub-goals, above {COLLAPSED_COSINE}), so its "
                       f"order is float noise; its decision support {mean_c:.3f} vs serving {mean_s:.3f} ({detail})")
    if serving.get(MEAN_COSINE, 0.0) > COLLAPSED_COSINE:
        return True, (f"promoted: the serving embedder has collapsed (mean cosine {serving[MEAN_COSINE]:.4f} between "
                      f"distinct sub-goals) and the candidate has not ({candidate.get(MEAN_COSINE, 0.0):.4f}); "
                      f"decision support {mean_c:.3f} vs serving {mean_s:.3f} ({detail})")
    promote = mean_c > mean_s + min_gain
    verdict = "promoted" if promote else "kept the serving model"
    return promote, (f"{verdict}: candidate mean decision support {mean_c:.3f} vs serving {mean_s:.3f}, judged by "
                     f"gold next actions (needs more than serving + {min_gain:g}; {detail})")


class RetrainController:
    """Watches the experiential KB, retrains after ``retrain.every`` new trajectories, gates, promotes.

    Args:
        config: the ``KnowMapConfig`` (or its ``model_dump()``).
        count_trajectories: how many trajectories the experiential KB holds; default: ask its Ray actor.
        reindex: build the experiential collection of a model dir and return when complete; default: the
            experiential-KB actor's ``ensure_index``.
        swap: hot-swap the retrieval service to these models; default: the running Serve app, if any.
    """

    def __init__(self, config: KnowMapConfig | dict[str, Any], *, count_trajectories: Callable[[], int] | None = None,
                 reindex: Reindex | None = None, swap: Swap | None = None) -> None:
        self.config = config if isinstance(config, KnowMapConfig) else KnowMapConfig.model_validate(config)
        self._count = count_trajectories or self._count_in_kb
        self._reindex = reindex or self._reindex_in_kb
        self._swap = swap or (lambda models: _swap_serve(self.config, models))
        self._stop = threading.Event()
        self._cycle_lock = threading.Lock()  # one cycle at a time, whoever asks
        self.state = self._load()

    # -- state --------------------------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.config.paths.retrain_state

    def _load(self) -> RetrainStatus:
        if self.state_path.is_file():
            try:
                return RetrainStatus.model_validate_json(self.state_path.read_text(encoding="utf-8"))
            except ValueError as e:
                raise KnowMapError(f"retrain state {self.state_path} is corrupt ({e}); move it aside to start "
                                   "over from the models in models/latest.json") from e

        latest = read_latest(self.config.paths)  # a model `knowmap train` made is what serves at first
        serving = ServingModels(embedder=latest.embedder or self.config.models.embedder,
                                reranker=latest.reranker or self.config.models.reranker,
                                train_tasks=latest.train_tasks, since=_now())
        return RetrainStatus(serving=serving, retrain_every=self.config.retrain.every)

    def _save(self) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(self.state.model_dump_json(indent=2), encoding="utf-8")
        tmp.replace(self.state_path)

    def status(self) -> dict[str, Any]:
        """The persisted state: serving and previous models, the last decision, every decision so far."""
        return self.state.model_dump(mode="json")

    # -- the loop -----------------------------------------------------------------------------------------------
    def pending(self) -> int:
        """New trajectories since the last cycle."""
        return max(0, self._count() - self.state.trajectories_at_last_cycle)

    def maybe_retrain(self) -> dict[str, Any] | None:
        """Run a cycle if ``retrain.every`` new trajectories arrived; returns its decision, or None."""
        if self.pending() < self.config.retrain.every:
            return None
        return self.retrain(trigger="new-trajectories")

    def watch(self, poll_seconds: float | None = None, max_cycles: int | None = None,
              progress: Callable[[int, dict[str, Any] | None], None] | None = None) -> int:
        """Poll the KB and run cycles until :meth:`stop` (or ``max_cycles``); returns the cycles run.

        A cycle that fails (training, the gate, a swap) is logged and tried again at the next poll, after the
        state file (what was promoted, trajectories counted at the last cycle) is read again: a watch, like a
        restarted one, resumes from the state file and never from what a failed cycle left in memory.

        Args:
            progress: called after every poll with the new trajectories pending and the cycle's decision (None
                when no cycle ran); ``knowmap retrain watch`` prints it as its progress line.
        """
        self._stop.clear()
        cycles = 0
        poll = poll_seconds or self.config.retrain.poll_seconds
        while not self._stop.is_set() and (max_cycles is None or cycles < max_cycles):
            decision = None
            try:
                decision = self.maybe_retrain()
            except Exception:  # noqa: BLE001 - the watch outlives a failed cycle; the next poll retries it
                logger.exception("a retrain cycle failed; retrying at the next poll")
                self.state = self._load()
            if decision is not None:
                cycles += 1
            if progress is not None:
                progress(self.pending(), decision)
            if max_cycles is None or cycles < max_cycles:
                self._stop.wait(poll)
        return cycles

    def stop(self) -> None:
        self._stop.set()

    # -- a cycle ------------------------------------------------------------------------------------------------
    def retrain(self, trigger: str = "manual") -> dict[str, Any]:
        """Train a candidate on all stored experience, gate it against the serving model, promote if better.

        Returns:
            the :class:`RetrainDecision`, as a dict.

        Raises:
            KnowMapError: no training data or no gate episodes; training failed.
        """
        with self._cycle_lock:
            started = time.perf_counter()
            trajectories = self._count()
            gate = self.gate_episodes()
            held_out = {(e.task, e.split, e.trajectory.variation) for e in gate}
            episodes = self.training_episodes(held_out)
            candidate = self._train(episodes)
            scores = self._evaluate(gate, {"serving": self.state.serving, "candidate": candidate})
            promote, reason = decide(scores["candidate"], scores["serving"], self.config.retrain.min_gain)
            candidate.scores = scores["candidate"]
            serving = self.state.serving.model_copy(update={"scores": scores["serving"]})
            decision = RetrainDecision(
                at=_now(), trigger=trigger, trajectories=trajectories, train_episodes=len(episodes),
                candidate=candidate, serving=serving, candidate_scores=scores["candidate"],
                serving_scores=scores["serving"], gate_episodes=sorted(e.episode_id for e in gate),
                promoted=promote, reason=reason,
            )
            if promote:
                self._promote(candidate)
            else:
                self.state.serving = serving
            decision.seconds = round(time.perf_counter() - started, 1)
            self.state.last_decision = decision
            self.state.history.append(decision)
            self.state.trajectories_at_last_cycle = trajectories
            self._save()
            logger.info("retrain cycle (%s, %d trajectories, %.0f s): %s", trigger, trajectories, decision.seconds,
                        reason)
            return decision.model_dump(mode="json")

    def rollback(self) -> dict[str, Any]:
        """Serve the previous model again (its collection was kept); returns the new status.

        Raises:
            KnowMapError: there is no previous model.
        """
        with self._cycle_lock:
            previous = self.state.previous
            if previous is None:
                raise KnowMapError("nothing to roll back to: no model has been promoted over another yet")
            self._promote(previous.model_copy(update={"since": ""}))
            self._save()
            return self.status()

    def gate_episodes(self, split: str = "dev") -> list[Any]:
        """The held-out dev episodes the gate judges on (annotated gold replays, cached under the data dir); with
        ``split="train"``, the gate tasks' train-split replays whose sub-goals are the experiential KB it
        retrieves from."""
        from knowmap.environment.episodes import collect_episodes
        from knowmap.jobs.training import episode_cache

        sw, rt = self.config.scienceworld, self.config.retrain
        variations = rt.gate_variations if split == "dev" else sw.variations
        episodes = collect_episodes(list(rt.gate_tasks or sw.tasks), split, variations,
                                    cache_dir=episode_cache(self.config), step_limit=sw.step_limit,
                                    simplifications=sw.simplifications, java_heap=sw.java_heap, annotate=True)
        if not episodes:
            raise KnowMapError("the gate has no dev episodes; set retrain.gate_tasks to tasks with dev variations")
        return episodes

    def training_episodes(self, held_out: set[tuple[str, str, int]]) -> list[Any]:
        """Every stored trajectory of the train and dev splits, except the gate's (task, split, variation)s."""
        from knowmap.environment.episodes import load_episodes

        if not self.config.paths.trajectories.is_dir():
            raise KnowMapError(f"no trajectories under {self.config.paths.trajectories}; run `knowmap build-kb` first")
        episodes = [e for split in ("train", "dev") for e in load_episodes(self.config.paths.trajectories, split)
                    if (e.task, e.split, e.trajectory.variation) not in held_out]
        if not episodes:
            raise KnowMapError("no training episodes outside the gate's held-out set; run `knowmap build-kb`")
        return episodes

    def _train(self, episodes: Sequence[Any]) -> ServingModels:
        from knowmap.jobs.training import train_retriever

        # splits: dev holds agent rollouts, never the gate's variations. A warm start fine-tunes the serving
        # models further on all stored data (older data replayed with the new), instead of the base model.
        serving, warm = self.state.serving, self.config.retrain.warm_start
        report = train_retriever(self.config, episodes=episodes, reranker=self.config.retrain.reranker,
                                 record_latest=False, out_dir=self.config.paths.retrain,
                                 tag=f"r{len(self.state.history) + 1}" + ("-warm" if warm else ""),
                                 splits=("train", "dev"), select=False,
                                 start_embedder=serving.embedder if warm else "",
                                 start_reranker=serving.reranker if warm else "")
        # Without a reranker of its own (retrain.reranker off) the candidate keeps the serving one.
        return ServingModels(embedder=report.embedder.model_dir,
                             reranker=report.reranker_dir or self.state.serving.reranker,
                             train_tasks=report.train_tasks)

    def _evaluate(self, gate: Sequence[Any], models: dict[str, ServingModels]) -> dict[str, dict[str, float]]:
        """Each side's served pipeline judged on the gate: its embedder, BM25 fused in when ``retrieval.hybrid``, and
        its own reranker fused in when ``retrieval.rerank``, so the gate covers the reranker whenever the service
        would use it."""
        from knowmap.evaluation.decision import decision_steps, evaluate_decision, experience_corpus
        from knowmap.models.embedder import Embedder
        from knowmap.models.reranker import Reranker

        device, agent, retrieval = self.config.models.device, self.config.agent, self.config.retrieval
        steps = decision_steps(gate, recent_window=agent.history_window)
        corpus = experience_corpus(self.gate_episodes("train"))
        wanted = (f"shortlist_recall@{agent.shortlist}", f"support@{agent.k_experience}_experience",
                  f"support@{agent.k_env}_env")
        out: dict[str, dict[str, float]] = {}
        probe = [doc.text for doc in corpus][:_COSINE_PROBE]
        for name, side in models.items():
            rerank = retrieval.rerank and bool(side.reranker)
            first = name + ("+bm25" if retrieval.hybrid else "")
            # Kept traced: a promoted candidate's swap then only loads the graph (no trace beside the service).
            embedder = Embedder(side.embedder, device=device, traced_dir=self.config.paths.traced_models)
            results = evaluate_decision(steps, corpus, embedders={name: embedder},
                                        reranker=Reranker(side.reranker, device=device) if rerank else None,
                                        rerank_modes=[first], hybrid_modes=[name] if retrieval.hybrid else [],
                                        settings=retrieval, k_env=agent.k_env,
                                        k_experience=agent.k_experience, shortlist_size=agent.shortlist)
            mode = results.modes[first + ("+rerank" if rerank else "")]
            out[name] = {m: float(mode[m]) for m in wanted if m in mode}
            if len(probe) > 1:
                vectors = embedder.encode(probe)  # (n, dim), unit length
                n = len(probe)
                out[name][MEAN_COSINE] = float(((vectors @ vectors.T).sum() - n) / (n * (n - 1)))
        return out

    def _promote(self, candidate: ServingModels) -> None:

        self._reindex(candidate.embedder)  # returns when the new collection is complete
        self._swap(candidate)
        self.state.previous = self.state.serving
        self.state.serving = candidate.model_copy(update={"since": _now()})
        record_latest(self.config.paths, candidate.embedder, candidate.reranker, candidate.train_tasks)

    # -- default wiring -----------------------------------------------------------------------------------------
    def _count_in_kb(self) -> int:
        from knowmap.actors.experience import get_experience_kb

        return int(ray.get(get_experience_kb(self.config).count.remote(kind="trajectory")))

    def _reindex_in_kb(self, embedder: str) -> None:
        from knowmap.actors.experience import get_experience_kb

        ray.get(get_experience_kb(self.config).ensure_index.remote(embedder, make_current=True))


def _swap_serve(config: KnowMapConfig, models: ServingModels) -> None:
    """Hot-swap the running retrieval service, if one runs in this Ray cluster (nothing to do otherwise: a
    service started later serves ``models/latest.json``, which promotion updates)."""
    from ray import serve

    from knowmap.serve.app import APP_NAME, swap_models

    if not ray.is_initialized():
        return
    try:
        running = APP_NAME in serve.status().applications
    except Exception:  # noqa: BLE001 - no Serve controller in this cluster
        running = False
    if running:
        swap_models(config, embedder=models.embedder, reranker=models.reranker)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class WatchingController(RetrainController):
    """A :class:`RetrainController` that watches from the moment it is made: as a Ray actor restarted after a
    crash, it is made again and so watches again, resuming from the state file."""

    def __init__(self, config: KnowMapConfig | dict[str, Any]) -> None:
        super().__init__(config)
        threading.Thread(target=self.watch, name="retrain-watch", daemon=True).start()


def get_retrain_controller(config: KnowMapConfig, *, watching: bool = False) -> ray.actor.ActorHandle:
    """The named, detached retrain-controller actor of this namespace (created on first use).

    It runs cycles in its own thread (``watch``) while ``status`` answers; training itself runs on Ray Train
    workers, so the controller asks for no CPU of its own. ``watching``: the actor watches from its start, and
    again after each of its restarts (``ray.max_restarts``; ``knowmap retrain watch --detach``).
    """
    cls = WatchingController if watching else RetrainController
    return ray.remote(cls).options(
        name=ACTOR_NAME, namespace=config.ray.namespace, get_if_exists=True, lifetime="detached", num_cpus=0,
        max_concurrency=4, max_restarts=config.ray.max_restarts,
    ).remote(config.model_dump(mode="json"))
