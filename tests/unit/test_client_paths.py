"""The typed client puts ids into URL paths: hostile ids are refused before any request, and every id it sends stays
one path segment of the route it was meant for (issue 40: ``delete_env(env_id="../trajectories/x")`` deleted a
trajectory). Checked against a recording transport: nothing is started, nothing leaves this process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import requests

from knowmap.errors import InvalidEnvIdError
from knowmap.serve.client import KnowMapClient, path_id

HOSTILE = ["../x", "..", ".", "%2e%2e/x", "%2e%2e", "x/../../y", "", "a" * 129, "a" * 100_000, "x\x00y", "\x00",
           "x y", " x", "x ", "\u2024\u2024/x", "\uff0e\uff0e", "x\n", "x\\..\\y", "x?y=1", "x#frag", "x/y",
           "trajectories/../../v1/envs/x", "%2F", "é", "x;y", "~x", "x@y", "acme@env-1"]
GOOD = ["env-1", "a" * 128, "boil.water_1", "...", "x..y", "-x", "ENV.1"]
# What the route of each call looks like, and the id's place in it.
ROUTES: dict[str, tuple[str, str]] = {
    "add_observations": ("POST", "/v1/envs/{}/observations"),
    "add_facts": ("POST", "/v1/envs/{}/facts"),
    "facts": ("GET", "/v1/envs/{}/facts"),
    "history": ("GET", "/v1/envs/{}/facts/history"),
    "delete_env": ("DELETE", "/v1/envs/{}"),
    "delete_trajectory": ("DELETE", "/v1/trajectories/{}"),
}
CALLS: dict[str, Callable[[KnowMapClient, Any], Any]] = {
    "add_observations": lambda c, i: c.add_observations(i, [{"step": 1, "text": "x"}]),
    "add_facts": lambda c, i: c.add_facts(i, 1, [{"subject": "a", "relation": "location", "object": "b"}]),
    "facts": lambda c, i: c.facts(i),
    "history": lambda c, i: c.history(i),
    "delete_env": lambda c, i: c.delete_env(i),
    "delete_trajectory": lambda c, i: c.delete_trajectory(i),
}
ANSWERS = {"add_observations": {"env_id": "e", "accepted": 1, "changes": 0, "last_step": 1, "facts": 0},
           "add_facts": {"env_id": "e", "accepted": 1, "changes": 0, "last_step": 1, "facts": 0},
           "facts": {"env_id": "e", "facts": []}, "history": {"env_id": "e", "facts": []},
           "delete_env": {"id": "e", "deleted": {}}, "delete_trajectory": {"id": "e", "deleted": {}}}


class Recorder(requests.adapters.BaseAdapter):
    """A transport that records each request and answers it with a canned body."""

    def __init__(self, answer: dict[str, Any]) -> None:
        super().__init__()
        self.sent: list[requests.PreparedRequest] = []
        self.answer = answer

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        self.sent.append(request)
        response = requests.Response()
        response.status_code, response._content = 200, requests.compat.json.dumps(self.answer).encode()
        response.request, response.url = request, request.url
        return response

    def close(self) -> None:
        pass


def recording_client(answer: dict[str, Any]) -> tuple[KnowMapClient, Recorder]:
    client = KnowMapClient("http://service.test", "k")
    recorder = Recorder(answer)
    client._session.mount("http://", recorder)
    return client, recorder


@pytest.mark.parametrize("call", sorted(CALLS))
def test_hostile_ids_are_refused_before_any_request(call: str) -> None:
    client, recorder = recording_client(ANSWERS[call])
    for hostile in [*HOSTILE, None, 7]:
        with pytest.raises(InvalidEnvIdError):
            CALLS[call](client, hostile)
    assert recorder.sent == []  # 0 requests: no hostile id reached the wire, so 0 path escapes


@pytest.mark.parametrize("call", sorted(CALLS))
def test_an_accepted_id_is_exactly_one_segment_of_its_route(call: str) -> None:
    method, template = ROUTES[call]
    client, recorder = recording_client(ANSWERS[call])
    for good in GOOD:
        CALLS[call](client, good)
        sent = recorder.sent[-1]
        path = urlsplit(sent.url).path
        prefix, suffix = template.split("{}")
        assert sent.method == method and path.startswith(prefix) and path.endswith(suffix), (good, path)
        segment = path[len(prefix):len(path) - len(suffix)]
        assert "/" not in segment and unquote(segment) == good


def test_path_id_quotes_as_one_segment_and_names_the_argument() -> None:
    assert path_id("env-1") == "env-1"
    with pytest.raises(InvalidEnvIdError, match="episode_id '../x' is not an id the API accepts"):
        path_id("../x", "episode_id")
    with pytest.raises(InvalidEnvIdError, match=r"env_id 'aaaa"):
        path_id("a" * 100_000)  # the message shows a prefix, not the whole id
