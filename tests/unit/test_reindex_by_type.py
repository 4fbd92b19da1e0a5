"""The retrieval backend decides by type, not message: it re-indexes on ``VersionNotIndexedError`` (also when the
error arrives wrapped by Ray from the experiential-KB actor) and lets every other error through, whatever its text.
No Ray cluster: the actor is a fake and ``ray.get`` passes values through."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from ray.exceptions import RayTaskError

from knowmap.errors import KnowMapError, VersionNotIndexedError
from knowmap.serve import retriever
from knowmap.serve.retriever import RetrievalBackend

ROW = {"id": "s1", "kind": "subgoal", "text": "boil water", "score": 0.5}


def ray_wrapped(error: Exception) -> Exception:
    """``error`` as ``ray.get`` raises it when an actor method raised it."""
    return RayTaskError("search_vectors", "Traceback: ...", error).as_instanceof_cause()


class Method:
    """A fake actor method: ``.remote`` returns what ``ray.get`` (patched to identity) then yields or raises."""

    def __init__(self, outcomes: list[Any]) -> None:
        self.outcomes, self.calls = outcomes, 0

    def remote(self, *args: Any) -> Any:
        self.calls += 1
        return self.outcomes.pop(0)


def unwrap(outcome: Any) -> Any:
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def backend(monkeypatch: pytest.MonkeyPatch, search: list[Any]) -> tuple[RetrievalBackend, SimpleNamespace]:
    monkeypatch.setattr(retriever, "ray", SimpleNamespace(get=unwrap))
    experience = SimpleNamespace(search_vectors=Method(search), ensure_index=Method([{"version": "v2"}]))
    b = RetrievalBackend.__new__(RetrievalBackend)  # only _search's one attribute: no actors, no Serve
    b._experience = experience
    return b, experience


@pytest.mark.parametrize("wrap", [lambda e: e, ray_wrapped], ids=["plain", "ray-wrapped"])
def test_a_version_the_actor_no_longer_holds_is_reindexed_and_searched_again(monkeypatch: pytest.MonkeyPatch,
                                                                            wrap: Any) -> None:
    missing = wrap(VersionNotIndexedError("no experiential collection for embedder version 'v2'"))
    assert isinstance(missing, VersionNotIndexedError)
    b, experience = backend(monkeypatch, [missing, [[ROW]]])
    found = b._search([([0.0], 3, None, None)], "/models/v2", "v2")
    assert [item.id for item in found[0]] == ["s1"]
    assert experience.ensure_index.calls == 1 and experience.search_vectors.calls == 2


@pytest.mark.parametrize("error", [KnowMapError("call ensure_index(<model path>) first"),  # the old text match
                                   ray_wrapped(KnowMapError("the vector store refused: ensure_index")),
                                   ValueError("bad vector")], ids=["message", "ray-wrapped-message", "other"])
def test_other_errors_are_not_reindexed_whatever_their_message(monkeypatch: pytest.MonkeyPatch,
                                                               error: Exception) -> None:
    b, experience = backend(monkeypatch, [error])
    with pytest.raises(type(error)):
        b._search([([0.0], 3, None, None)], "/models/v2", "v2")
    assert experience.ensure_index.calls == 0
