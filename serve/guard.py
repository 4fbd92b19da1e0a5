"""What every HTTP request of the retrieval API passes before a route sees it: the key, the body, the deadline.

:class:`Guard` is plain ASGI rather than ``@app.middleware("http")``: Starlette's ``BaseHTTPMiddleware`` runs every
request in a task group with memory streams, a measurable share of the ingress's CPU per request on two cores.
Every refusal has the API's one error shape (:func:`error_response`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from knowmap.api_schemas import ErrorDetail, ErrorResponse
from knowmap.serve.auth import match_key
from knowmap.serve.metrics import record_request

OPEN = {"/healthz", "/readyz"}
DOCS = {"/docs", "/openapi.json"}
DOCS_PREFIX = "/docs/"  # Swagger UI's own scripts and styles (nothing of this API): always open
RETRY_AFTER_S = 1  # a 429's Retry-After: a request of this API takes milliseconds to a few seconds
BOMS = (b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")  # UTF-8's, UTF-16's (and UTF-32 LE's, which starts alike)


def error_response(status: int, detail: ErrorDetail, headers: dict[str, str] | None = None) -> JSONResponse:
    """``{"error": {...}}`` with ``status``: the body of every error the API answers."""
    return JSONResponse(ErrorResponse(error=detail).model_dump(exclude_none=True), status_code=status,
                        headers=headers)


class Guard:
    """Before any routing or body parsing: 401 without an accepted bearer key (all but /healthz, and the docs when
    ``serve.public_docs``), else the key's tenant and role in ``request.state`` for the routes; 429 (with
    ``Retry-After``) when the key already has ``serve.max_ongoing_per_key`` requests in flight in this replica, so
    one key cannot hold more than its share of the replica's ``serve.max_ongoing_requests`` slots; 413 if the body
    is over ``serve.max_body_bytes``, by its declared length and by the bytes actually received (a chunked upload
    declares none), counted as they arrive, so an oversized body is never held whole; 408 if the whole body has not
    arrived ``serve.body_timeout_s`` after the head (a deadline, not an idle timer: a byte every few seconds does
    not extend it); 415 if the body is not UTF-8 JSON's encoding (a byte-order mark, NUL bytes of UTF-16/32, or
    another declared charset: JSON decoders would accept them, the API does not). A refusal that leaves a body
    unread closes the connection (``Connection: close``): the server never reads on through a body it refused.
    Then the route runs under ``serve.request_timeout_s``: past it, the route is cancelled and the answer is 504
    (work a KB actor already took on may still finish; a retry is safe: writes are idempotent, and a resent
    trajectory is accepted). Every answer is counted in the service's metrics (:mod:`knowmap.serve.metrics`).
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.in_flight: dict[str, int] = {}  # requests from its head to its answer, per key, in this replica

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, tracked)
        finally:  # by route template (never an id from the path): refused requests count as "unrouted"
            route = getattr(scope.get("route"), "path", "unrouted")
            record_request(route, scope.get("method", ""), status, time.perf_counter() - started)

    async def _handle(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        request = Request(scope)
        limits = request.app.state.config.serve
        rejection = self._check(request)
        key = scope.get("state", {}).get("client") if rejection is None else None
        if key is not None and self.in_flight.get(key, 0) >= limits.max_ongoing_per_key:
            rejection = error_response(429, ErrorDetail(
                type="rate_limited", code="too_many_requests", message=f"this key already has "
                f"serve.max_ongoing_per_key ({limits.max_ongoing_per_key}) requests in flight; retry after one "
                "finishes"), {"Retry-After": str(RETRY_AFTER_S)})
        if rejection is not None:
            await _unread_body_closes(rejection, request)(scope, receive, send)
            return
        if key is not None:
            self.in_flight[key] = self.in_flight.get(key, 0) + 1
        try:
            await self._read_and_run(request, limits, scope, receive, send)
        finally:
            if key is not None:
                left = self.in_flight.pop(key) - 1
                if left:
                    self.in_flight[key] = left

    async def _read_and_run(self, request: Request, limits: Any, scope: dict[str, Any], receive: Any,
                            send: Any) -> None:
        rejection = None
        if request.url.path not in OPEN and not request.url.path.startswith(DOCS_PREFIX):
            try:
                body = await _read_body(receive, limits.max_body_bytes, limits.body_timeout_s)
            except TimeoutError:
                rejection = error_response(408, ErrorDetail(
                    type="timeout", code="body_timeout", message=f"the request body did not arrive whole within "
                    f"serve.body_timeout_s ({limits.body_timeout_s} s) of its head; send it at once"),
                    {"Connection": "close"})
            else:
                if body is None:
                    rejection = _too_large(f"more than {limits.max_body_bytes}", limits.max_body_bytes)
                    rejection.headers["Connection"] = "close"  # the rest of the body is never read
                else:
                    rejection = _not_utf8(request, body)
                    receive = _replay(body, receive)
        if rejection is not None:
            await rejection(scope, receive, send)
            return
        await _within(limits.request_timeout_s, self.app, scope, receive, send)

    @staticmethod
    def _check(request: Request) -> JSONResponse | None:
        state, path = request.app.state, request.url.path
        if path in OPEN or path.startswith(DOCS_PREFIX) or (path in DOCS and state.config.serve.public_docs):
            return None
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        grant = match_key(presented.strip(), state.grants) if scheme.lower() == "bearer" else None
        if grant is not None:
            request.scope.setdefault("state", {}).update(client="key:" + grant.digest[:12], tenant=grant.tenant,
                                                         role=grant.role)
        else:
            return error_response(401, ErrorDetail(type="unauthorized", message="missing or wrong API key: send "
                                                   "`Authorization: Bearer <key>` (serve.api_keys, or the key file "
                                                   "that `knowmap serve` printed)"), {"WWW-Authenticate": "Bearer"})
        length = request.headers.get("content-length", "").strip()
        if length.isdigit() and int(length) > state.config.serve.max_body_bytes:
            return _too_large(length, state.config.serve.max_body_bytes)
        return None


async def _within(seconds: float, app: Any, scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Run ``app`` for at most ``seconds``; past that, cancel it and answer 504 (if it has not begun answering)."""
    started = False

    async def tracked(message: dict[str, Any]) -> None:
        nonlocal started
        started = started or message["type"] == "http.response.start"
        await send(message)

    try:
        async with asyncio.timeout(seconds) as deadline:
            await app(scope, receive, tracked)
    except TimeoutError:
        if not deadline.expired() or started:
            raise
        await error_response(504, ErrorDetail(
            type="timeout", code="deadline_exceeded", message=f"the request did not finish within "
            f"serve.request_timeout_s ({seconds} s); retry (writes are idempotent), or send less per request"),
        )(scope, receive, send)


def _too_large(size: str, limit: int) -> JSONResponse:
    return error_response(413, ErrorDetail(type="too_large", message=f"request body of {size} bytes is over "
                                           f"serve.max_body_bytes ({limit})", code="body_too_large"))


async def _read_body(receive: Any, limit: int, deadline_s: float) -> bytes | None:
    """The whole request body, or None as soon as more than ``limit`` bytes have arrived.

    Raises:
        TimeoutError: the body had not arrived whole ``deadline_s`` after this call began.
    """
    chunks, size = [], 0
    async with asyncio.timeout(deadline_s):
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: what came is what there is
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return None
            if not message.get("more_body", False):
                break
    return b"".join(chunks)


def _not_utf8(request: Request, body: bytes) -> JSONResponse | None:
    """415 ``utf8_required`` for a body that JSON decoders would read in another encoding than UTF-8: a byte-order
    mark, NUL bytes (UTF-16 or UTF-32 without a mark; JSON text in UTF-8 escapes NUL), or a declared charset other
    than utf-8. Bytes that are not UTF-8 at all fail JSON parsing: 422, like any malformed body."""
    charset = ""
    for param in request.headers.get("content-type", "").split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
    if not (body.startswith(BOMS) or b"\x00" in body or charset not in ("", "utf-8", "utf8")):
        return None
    return error_response(415, ErrorDetail(
        type="invalid_request", code="utf8_required", message="request bodies must be JSON in UTF-8, without a "
        "byte-order mark (this one " + (f"declares charset={charset}" if charset not in ("", "utf-8", "utf8")
                                       else "is in UTF-16 or UTF-32, or starts with a byte-order mark") + ")"))


def _unread_body_closes(response: JSONResponse, request: Request) -> JSONResponse:
    """``response``, with ``Connection: close`` if the request may have a body that nobody will read."""
    length = request.headers.get("content-length", "0").strip()
    if "transfer-encoding" in request.headers or length not in ("", "0"):
        response.headers["Connection"] = "close"
    return response


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that gives the app the body already read, then whatever the connection says next."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
