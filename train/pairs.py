"""Training pairs for the retriever (InfoNCE), from the retrieval moments of train-split episodes.

What a moment's query, corpus and positives are is defined once, in :mod:`knowmap.evaluation.moments` (shared
with the evaluation queries); this module samples them into :class:`~knowmap.schemas.TrainingPair` s: per query
up to ``max_positives`` pairs, each with hard negatives mined by the base embedder's similarity to the query (for
experience, from below ``theta - negative_margin``: the band just under the threshold is ambiguous and left out).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from knowmap.environment.episodes import Episode
from knowmap.errors import SplitError
from knowmap.evaluation.moments import DEFAULT_THETA, KINDS, Encoder, check_kinds, examples
from knowmap.schemas import TrainingPair


@dataclass
class PairSet:
    """Training pairs per kind, what was skipped, the parameters and a hash of the whole data."""

    env: list[TrainingPair]
    experience: list[TrainingPair]
    joint: list[TrainingPair]
    params: dict[str, Any]
    skipped: dict[str, int]  # sub-goals that gave no pair, per kind (no positive)
    data_hash: str = ""

    def __post_init__(self) -> None:
        if not self.data_hash:
            body = json.dumps({"params": self.params, "pairs": [p.model_dump(mode="json") for p in self.pairs()]},
                              sort_keys=True, separators=(",", ":"))
            self.data_hash = hashlib.sha256(body.encode("utf-8")).hexdigest()[:16]

    @property
    def counts(self) -> dict[str, int]:
        return {kind: len(getattr(self, kind)) for kind in KINDS}

    def pairs(self, kinds: Sequence[str] = KINDS) -> list[TrainingPair]:
        """The pairs of ``kinds``, kind by kind, in construction order."""
        return [p for kind in check_kinds(kinds) for p in getattr(self, kind)]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-able), e.g. to pass to Ray Train workers or write next to a checkpoint."""
        return {"params": self.params, "skipped": self.skipped, "data_hash": self.data_hash,
                **{kind: [p.model_dump(mode="json") for p in getattr(self, kind)] for kind in KINDS}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PairSet:
        return cls(**{kind: [TrainingPair.model_validate(p) for p in data[kind]] for kind in KINDS},
                   params=data["params"], skipped=data["skipped"], data_hash=data["data_hash"])


def build_pairs(
    episodes: Sequence[Episode],
    embedder: Encoder,
    *,
    theta: float = DEFAULT_THETA,
    max_positives: int = 8,
    max_negatives: int = 7,
    negative_margin: float = 0.05,
    joint_facts: int = 5,
    seed: int = 0,
    splits: Sequence[str] = ("train",),
) -> PairSet:
    """Training pairs of all three kinds from train-split episodes.

    One pair per (query, positive), at most ``max_positives`` per query (the best first). Each pair's negatives
    are ``max_negatives`` drawn, with a generator seeded by ``seed`` and the pair's identity, from the
    ``2 * max_negatives`` hardest non-positives, so pairs of the same query see different hard negatives.
    Pairs with the same (query, positive) are kept once; empty texts are dropped.

    Args:
        episodes: train-split episodes (:func:`collect_episodes`, :func:`load_episodes`).
        embedder: the base embedder: it defines experience positives (``theta``) and ranks hard negatives.
        theta: cosine threshold for two sub-goals of different trajectories to count as the same experience.
        max_positives, max_negatives: per query and per pair; ``max_negatives`` may be 0.
        negative_margin: experience negatives must be at most ``theta - negative_margin`` similar.
        joint_facts: env facts injected into each joint query.
        seed: the same seed and episodes give the same pairs (and ``data_hash``).
        splits: the splits episodes may come from. Only ``train`` by default; the retrain controller also passes
            ``dev``, for agent rollouts on dev variations that its gate never evaluates on. Never ``test``.

    Returns:
        a :class:`PairSet`.

    Raises:
        SplitError: an episode is not from the train split (dev/test data must never reach training).
        ValueError: a parameter out of range (the message says the allowed range).
    """
    _check_params(theta, max_positives, max_negatives, negative_margin, joint_facts)
    if "test" in splits:
        raise SplitError("test-split episodes never become training pairs: the test split is for reporting")
    wrong = sorted({e.split for e in episodes if e.split not in splits})
    if wrong:
        raise SplitError(f"build_pairs takes {'/'.join(splits)}-split episodes only, got {wrong}; evaluate "
                         "held-out episodes with eval_queries instead")
    params = {"theta": theta, "max_positives": max_positives, "max_negatives": max_negatives,
              "negative_margin": negative_margin, "joint_facts": joint_facts, "seed": seed,
              "episodes": sorted(e.episode_id for e in episodes)}
    out: dict[str, list[TrainingPair]] = {kind: [] for kind in KINDS}
    skipped = dict.fromkeys(KINDS, 0)
    for kind in KINDS:
        seen: set[tuple[str, str]] = set()
        for ex in examples(episodes, kind, embedder, theta=theta, negative_margin=negative_margin,
                            joint_facts=joint_facts):
            if not ex.positives:
                skipped[kind] += 1
                continue
            positives = set(ex.positives)
            ranked = sorted((t for t in ex.corpus if t not in ex.excluded and t not in positives),
                            key=lambda t: -ex.rank_scores.get(t, 0.0))  # stable: ties keep corpus order
            pool = ranked[: 2 * max_negatives]
            for number, positive in enumerate(ex.positives[:max_positives]):
                if (ex.query, positive) in seen:
                    continue
                seen.add((ex.query, positive))
                rng = random.Random(f"{seed}|{kind}|{ex.episode_id}|{ex.subgoal_index}|{number}")
                picked = sorted(rng.sample(range(len(pool)), min(max_negatives, len(pool))))
                out[kind].append(TrainingPair(kind=kind, query=ex.query, positive=positive,
                                              negatives=[pool[i] for i in picked], task=ex.task,
                                              episode_id=ex.episode_id))
    return PairSet(env=out["env"], experience=out["experience"], joint=out["joint"], params=params,
                   skipped=skipped)


def _check_params(theta: float, max_positives: int, max_negatives: int, margin: float, joint_facts: int) -> None:
    if not -1.0 <= theta < 1.0:
        raise ValueError(f"theta must be a cosine in [-1, 1), got {theta}")
    if max_positives < 1:
        raise ValueError(f"max_positives must be >= 1, got {max_positives}")
    if max_negatives < 0:
        raise ValueError(f"max_negatives must be >= 0, got {max_negatives}")
    if margin < 0:
        raise ValueError(f"negative_margin must be >= 0, got {margin}")
    if joint_facts < 0:
        raise ValueError(f"joint_facts must be >= 0, got {joint_facts}")
