"""The native remote-generation protocol, shared by the server and the Python client.

POST /v1/offload/generate with a msgpack map (content type application/msgpack):
    {"v": 1, "prompt": str | [int], "max_new_tokens": int, "temperature": float,
     "top_p": float, "top_k": int, "seed": int | nil, "stop": str | int | [str | int] | nil,
     "stream": bool, "logprobs": int | nil, "prompt_logprobs": int | nil,
     "presence_penalty": float, "frequency_penalty": float, "repetition_penalty": float,
     "logit_bias": [[int, float]] | nil, "min_tokens": int, "ignore_eos": bool,
     "json_schema": map | str | nil}
(every field but the prompt optional; meanings as in SamplingParams; json_schema, a JSON
schema the output follows, came later in version 1: an older server refuses it by name).
The answer is a sequence of msgpack maps, one after the other in the body:
    {"v": 1, "type": "token", "token_ids": [int], "text": str,
     "logprobs": [Logprob]}                                          (streaming only)
    {"v": 1, "type": "done", "token_ids": [int], "text": str | nil,
     "finish_reason": "stop" | "length", "prompt_tokens": int,
     "logprobs": [Logprob] | nil, "prompt_logprobs": [Logprob] | nil} (the last frame)
with Logprob = [token id, logprob | nil, [[token id, logprob], ...]] (the top tokens).
    {"v": 1, "type": "error", "status": int, "message": str}        (instead of "done")
Errors before the first frame come with their HTTP status (400, 401, 413, 429, 500) and one
error frame — or, from the parts of the server that answer before reading the body (auth, size
limit), a JSON body {"error": {"message": ...}}.

Nothing here unpickles: msgpack with sizes bounded by the body's own length.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgpack

from offload_rt.results import RequestError

VERSION = 1
PATH = "/v1/offload/generate"
CONTENT_TYPE = "application/msgpack"
MAX_REQUEST_BYTES = 1 << 20  # a prompt of 1 MiB is far past any context; more is refused
MAX_FRAME_BYTES = 16 << 20  # the client's bound on one answer frame

REQUEST_FIELDS = {
    "prompt": (str, list),
    "max_new_tokens": (int,),
    "temperature": (int, float),
    "top_p": (int, float),
    "top_k": (int,),
    "seed": (int, type(None)),
    "stop": (str, int, list, type(None)),
    "stream": (bool,),
    "logprobs": (int, type(None)),
    "prompt_logprobs": (int, type(None)),
    "presence_penalty": (int, float),
    "frequency_penalty": (int, float),
    "repetition_penalty": (int, float),
    "logit_bias": (list, type(None)),
    "min_tokens": (int,),
    "ignore_eos": (bool,),
    "json_schema": (dict, str, type(None)),
}


class ProtocolError(ValueError):
    """A frame or request that does not follow this protocol; the message says where."""


class RemoteError(RuntimeError):
    """The server answered with an error; `status` is its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"server error {status}: {message}")
        self.status = status
        self.message = message


class InvalidRequest(RemoteError, RequestError):
    """400: the server refused the request as asked; the message names the field."""


class AuthenticationError(RemoteError):
    """401: the server wants `api_key` (a bearer token) and did not get the right one."""


class ServerBusy(RemoteError):
    """429: every batch row is busy and the queue is full; try again later."""


def error_for(status: int, message: str) -> RemoteError:
    kinds = {400: InvalidRequest, 401: AuthenticationError, 429: ServerBusy}
    return kinds.get(status, RemoteError)(status, message)


def pack(frame: dict[str, Any]) -> bytes:
    return msgpack.packb({"v": VERSION, **frame}, use_bin_type=True)


def decode_request(body: bytes) -> dict[str, Any]:
    """The request's fields, checked for kind (values are checked by SamplingParams)."""
    if len(body) > MAX_REQUEST_BYTES:
        raise ProtocolError(f"the request has {len(body)} bytes; the most is {MAX_REQUEST_BYTES}")
    try:
        req = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types for broken input
        raise ProtocolError(f"the body is not one msgpack object ({type(e).__name__}: {e})") from e
    if not isinstance(req, dict):
        raise ProtocolError(f"the request must be a msgpack map, got {type(req).__name__}")
    if req.get("v", VERSION) != VERSION:
        raise ProtocolError(f"protocol version {req.get('v')!r}; this server speaks {VERSION}")
    unknown = sorted(str(k) for k in req if k != "v" and k not in REQUEST_FIELDS)
    if unknown:
        raise ProtocolError(f"unknown request fields: {', '.join(unknown)}")
    if "prompt" not in req:
        raise ProtocolError("the request has no prompt")
    for name, kinds in REQUEST_FIELDS.items():
        value = req.get(name)
        if name in req and (
            not isinstance(value, kinds) or isinstance(value, bool) != (bool in kinds)
        ):
            allowed = " or ".join(k.__name__ for k in kinds)
            raise ProtocolError(f"{name} must be {allowed}, got {type(value).__name__}")
    return {k: v for k, v in req.items() if k != "v"}


def iter_frames(chunks: Iterator[bytes]) -> Iterator[dict[str, Any]]:
    """Frames from the bytes of an answer body as they arrive."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_FRAME_BYTES)
    for chunk in chunks:
        unpacker.feed(chunk)
        for frame in unpacker:
            yield check_frame(frame)


def check_frame(frame: object) -> dict[str, Any]:
    if not isinstance(frame, dict) or frame.get("type") not in ("token", "done", "error"):
        raise ProtocolError(f"not a frame of this protocol: {str(frame)[:200]}")
    if frame.get("v") != VERSION:
        raise ProtocolError(f"frame of protocol version {frame.get('v')!r}; expected {VERSION}")
    return frame
