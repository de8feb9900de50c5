"""Python client of `offload-rt serve`, over the native msgpack endpoint.

    model = offload_rt.connect("http://127.0.0.1:8000", api_key=None)
    model.generate("Hello", max_new_tokens=16)          # same arguments and result as local
    for piece in model.stream("Hello"): print(piece, end="")

`connect_async` gives the same with `await` and `async for`. Errors the server sends come back
as exceptions: `InvalidRequest` (400, also a `RequestError` like the local model's),
`AuthenticationError` (401), `ServerBusy` (429), `RemoteError` (any other).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import msgpack

from offload_rt import protocol
from offload_rt.protocol import RemoteError
from offload_rt.results import GenerationResult, TokenLogprob

Prompt = str | Sequence[int]
DEFAULT_TIMEOUT_S = 600.0  # one request: a long generation on a slow, offloaded model
MAX_PARALLEL = 16  # requests a batch call keeps in flight; the server batches them together


def connect(
    url: str, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT_S
) -> RemoteModel:
    return RemoteModel(url, api_key, timeout)


def connect_async(
    url: str, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT_S
) -> AsyncRemoteModel:
    return AsyncRemoteModel(url, api_key, timeout)


def _request(prompt: Prompt, stream: bool, **kw: Any) -> bytes:
    if not isinstance(prompt, str):
        prompt = list(prompt)
    stop = kw.pop("stop", None)
    if stop is not None and not isinstance(stop, (str, int)):
        stop = list(stop)
    bias = kw.get("logit_bias")
    if isinstance(bias, dict):  # msgpack map keys must be strings here: send pairs
        kw["logit_bias"] = [[t, b] for t, b in bias.items()]
    return protocol.pack({"prompt": prompt, "stop": stop, "stream": stream, **kw})


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"content-type": protocol.CONTENT_TYPE}
    if api_key is not None:
        headers["authorization"] = f"Bearer {api_key}"
    return headers


def _is_batch(prompt: object) -> bool:
    return not isinstance(prompt, str) and bool(prompt) and not isinstance(prompt[0], int)  # type: ignore[index]


def _result(frame: dict[str, Any]) -> GenerationResult:
    return GenerationResult(
        frame["token_ids"],
        frame["text"],
        frame["finish_reason"],
        frame["prompt_tokens"],
        _logprobs(frame.get("logprobs")),
        _logprobs(frame.get("prompt_logprobs")),
    )


def _logprobs(wire: list | None) -> list[TokenLogprob] | None:
    """[token, logprob, [[id, logprob], ...]] entries (protocol.py) as the local model's."""
    if wire is None:
        return None
    return [TokenLogprob(t, lp, tuple((i, v) for i, v in top)) for t, lp, top in wire]


def _raise_for(status: int, body: bytes) -> None:
    """The server's error as an exception; its message from a msgpack frame or JSON."""
    message = body[:500].decode("utf-8", "replace")
    try:
        frame = msgpack.unpackb(body, raw=False)
        message = frame["message"]
    except Exception:  # noqa: BLE001 - not a frame: maybe the JSON of the auth/size guard
        try:
            message = json.loads(body)["error"]["message"]
        except (ValueError, KeyError, TypeError):  # neither: keep the raw text
            pass
    raise protocol.error_for(status, message)


def _final(frame: dict[str, Any]) -> GenerationResult | None:
    if frame["type"] == "error":
        raise protocol.error_for(int(frame.get("status", 500)), str(frame.get("message")))
    return _result(frame) if frame["type"] == "done" else None


class RemoteModel:
    """A model served by `offload-rt serve`, used like the one `offload_rt.load` returns."""

    def __init__(self, url: str, api_key: str | None, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=_headers(api_key), timeout=timeout)

    def generate(
        self, prompt: Prompt | Sequence[Prompt], **kw: Any
    ) -> GenerationResult | list[GenerationResult]:
        """Arguments of `OffloadModel.generate`: max_new_tokens, temperature, top_p, top_k,
        seed, stop, logprobs, prompt_logprobs, the penalties, logit_bias, min_tokens,
        ignore_eos, json_schema. A list of prompts goes as concurrent requests, batched by
        the server."""
        if not _is_batch(prompt):
            return self._one(prompt, kw)  # type: ignore[arg-type]
        with ThreadPoolExecutor(min(MAX_PARALLEL, len(prompt))) as pool:  # type: ignore[arg-type]
            return list(pool.map(lambda p: self._one(p, kw), prompt))

    def stream(self, prompt: Prompt, **kw: Any) -> Iterator[str]:
        """Text pieces as the server makes them; their concatenation is the result's text."""
        for _, text in self.stream_tokens(prompt, **kw):
            yield text

    def stream_tokens(self, prompt: Prompt, **kw: Any) -> Iterator[tuple[list[int], str]]:
        """(new token ids, new text) as the server makes them."""
        for frame in self._frames(prompt, kw, stream=True):
            if _final(frame) is None:
                yield frame["token_ids"], frame["text"]

    def health(self) -> dict[str, Any]:
        try:
            return self.http.get("/health").json()
        except httpx.TransportError as e:
            raise ConnectionError(f"offload_rt server at {self.url}: {e}") from e

    def _one(self, prompt: Prompt, kw: dict[str, Any]) -> GenerationResult:
        for frame in self._frames(prompt, kw, stream=False):
            result = _final(frame)
            if result is not None:
                return result
        raise RemoteError(200, "the server's answer ended without a result")

    def _frames(self, prompt: Prompt, kw: dict[str, Any], stream: bool) -> Iterator[dict]:
        body = _request(prompt, stream, **kw)
        try:
            with self.http.stream("POST", protocol.PATH, content=body) as r:
                if r.status_code != 200:
                    _raise_for(r.status_code, r.read())
                yield from protocol.iter_frames(r.iter_bytes())
        except httpx.TransportError as e:
            raise ConnectionError(f"offload_rt server at {self.url}: {e}") from e

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RemoteModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRemoteModel:
    """`RemoteModel` for asyncio: `await generate(...)`, `async for piece in stream(...)`."""

    def __init__(self, url: str, api_key: str | None, timeout: float) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.AsyncClient(base_url=self.url, headers=_headers(api_key), timeout=timeout)

    async def generate(
        self, prompt: Prompt | Sequence[Prompt], **kw: Any
    ) -> GenerationResult | list[GenerationResult]:
        if not _is_batch(prompt):
            return await self._one(prompt, kw)  # type: ignore[arg-type]
        return list(await asyncio.gather(*(self._one(p, kw) for p in prompt)))  # type: ignore[union-attr]

    async def stream(self, prompt: Prompt, **kw: Any) -> AsyncIterator[str]:
        async for _, text in self.stream_tokens(prompt, **kw):
            yield text

    async def stream_tokens(
        self, prompt: Prompt, **kw: Any
    ) -> AsyncIterator[tuple[list[int], str]]:
        async for frame in self._frames(prompt, kw, stream=True):
            if _final(frame) is None:
                yield frame["token_ids"], frame["text"]

    async def _one(self, prompt: Prompt, kw: dict[str, Any]) -> GenerationResult:
        async for frame in self._frames(prompt, kw, stream=False):
            result = _final(frame)
            if result is not None:
                return result
        raise RemoteError(200, "the server's answer ended without a result")

    async def _frames(self, prompt: Prompt, kw: dict[str, Any], stream: bool):
        body = _request(prompt, stream, **kw)
        try:
            async with self.http.stream("POST", protocol.PATH, content=body) as r:
                if r.status_code != 200:
                    _raise_for(r.status_code, await r.aread())
                unpacker = msgpack.Unpacker(raw=False, max_buffer_size=protocol.MAX_FRAME_BYTES)
                async for chunk in r.aiter_bytes():
                    unpacker.feed(chunk)
                    for frame in unpacker:
                        yield protocol.check_frame(frame)
        except httpx.TransportError as e:
            raise ConnectionError(f"offload_rt server at {self.url}: {e}") from e

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncRemoteModel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
