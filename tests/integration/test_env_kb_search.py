"""The retrieval pipeline over an env KB built from a real gold trajectory, with the real packaged MiniLM."""

from __future__ import annotations

from pathlib import Path

import pytest

from knowmap.config import RetrievalConfig
from knowmap.kb.environment_kb import build_env_kb
from knowmap.models.retrieval import Retriever
from knowmap.schemas import Trajectory

pytestmark = pytest.mark.integration
FIXTURE = Path(__file__).parents[1] / "fixtures" / "trajectories" / "boil-0.json"


def test_search_finds_the_relevant_fact_now_and_in_the_past(embedder) -> None:
    kb = build_env_kb(Trajectory.model_validate_json(FIXTURE.read_text()))
    retriever = Retriever(embedder.encode, settings=RetrievalConfig(hybrid=False),  # the embedder's own ranking
                          env_facts=lambda env_id, step: kb.current() if step is None else kb.as_of(step))

    def search(query: str, step: int | None = None) -> list:
        return retriever.retrieve(query, env_id=kb.env_id, k=3, kbs=("env",), step=step)

    now = search("where is the metal pot")
    assert now[0].text == "metal pot is in the stove" and now[0].provenance["valid_to"] is None
    assert [h.score for h in now] == sorted((h.score for h in now), reverse=True)
    # At step 9 the pot was in the sink, and the KB still knows it.
    then = {h.text: h for h in search("where is the metal pot", step=9)}
    assert "metal pot is in the sink" in then and "metal pot is in the stove" not in then
    sink = then["metal pot is in the sink"].provenance
    assert sink["valid_from"] <= 9 < sink["valid_to"]
