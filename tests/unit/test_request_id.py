"""``X-Request-ID`` (issue 40: echoed back unvalidated, 3 kB with markup): composed exactly as Serve composes a
uvicorn server's app (its own ``RequestIdMiddleware``, then what the proxy callback returns), a bad id is replaced
by a generated one in the answer and in what the app and Serve's logs see; a valid id passes unchanged."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from ray.serve._private.http_util import _apply_middlewares

from knowmap.serve.http import REQUEST_ID, proxy_callback
from knowmap.serve.proxy import CALLBACK


def answer(request_ids: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """(the ids the app saw, the X-Request-ID headers of the answer) for one request."""
    seen: list[bytes] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.extend(v for k, v in scope["headers"] if k == b"x-request-id")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    served = _apply_middlewares(app, proxy_callback())
    scope = {"type": "http", "method": "GET", "path": "/healthz", "headers": [(b"x-request-id", v) for v in
                                                                              request_ids]}
    asyncio.run(served(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return seen, [v for k, v in start["headers"] if k.lower() == b"x-request-id"]


def test_serve_is_pointed_at_the_callback() -> None:
    assert f"{proxy_callback.__module__}:{proxy_callback.__name__}" == CALLBACK


def test_a_valid_request_id_passes_unchanged() -> None:
    for good in (b"abc-123", b"a" * 128, b"trace.1_2-3"):
        assert answer([good]) == ([good], [good])


def test_a_bad_request_id_is_replaced_everywhere() -> None:
    hostile = [b"<script>alert(1)</script>", b"x" * 3000, b"a" * 129, b"a b", b"a\tb", b"", b"\xc3\xa9",
               b"id\r\nSet-Cookie: x=1", b"../x"]
    for bad in hostile:
        seen, echoed = answer([bad])
        assert len(echoed) == 1 and seen == echoed and echoed[0] != bad
        assert re.fullmatch(REQUEST_ID, echoed[0].decode()) and len(echoed[0]) <= 128
    seen, echoed = answer([b"one", b"two"])  # twice: which one would a log trust?
    assert len(echoed) == 1 and echoed[0] not in (b"one", b"two")
