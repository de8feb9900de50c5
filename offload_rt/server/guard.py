"""What every request passes before a route sees it: the bearer token, a bounded body, and
a count in the metrics. Pure ASGI, so a refused request never reaches the application."""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/health"})  # answered without the API key: load balancers probe it


class Guard:
    def __init__(
        self,
        app: ASGIApp,
        api_key: str | None,
        max_body_bytes: int,
        count: Callable[[str, int], None],
        known_paths: frozenset[str],
    ) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.count = count  # (path, status) -> None
        self.known_paths = known_paths  # others are counted as "other": bounded labels

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in self.known_paths else "other"

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.count(path, message["status"])
            await send(message)

        if not self._authorized(scope):
            await _refuse(
                counted_send, 401, "missing or wrong API key: send 'Authorization: Bearer KEY'"
            )
            return
        body = await self._read_body(scope, receive)
        if body is None:
            await _refuse(
                counted_send, 413, f"the request body is over {self.max_body_bytes} bytes"
            )
            return
        await self.app(scope, _replay(body, receive), counted_send)

    def _authorized(self, scope: Scope) -> bool:
        if self.api_key is None or scope["path"] in OPEN_PATHS:
            return True
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"")
        want = b"Bearer " + self.api_key.encode()
        return hmac.compare_digest(given, want)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None past the limit (read no further than the limit)."""
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return None
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away; the route will see the disconnect
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                break
        return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body once, then the client's own messages (so a disconnect is still seen)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _refuse(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": error_body(message, status)}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def error_body(message: str, status: int) -> dict[str, Any]:
    """OpenAI's error object."""
    kinds = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
    }
    return {
        "message": message,
        "type": kinds.get(status, "server_error"),
        "param": None,
        "code": status,
    }
