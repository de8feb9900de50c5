"""Request bodies of the OpenAI-compatible endpoints, validated strictly: a wrong type is a
400 that names the field, never a guess ("5" is not 5).

Fields the runtime cannot honour (n > 1, logprobs, echo, penalties, logit_bias, tools) are
refused by name rather than silently ignored; unknown extra fields are ignored, as OpenAI's
own server does for forward compatibility.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from offload_rt.engine import RequestError, SamplingParams

Number = StrictInt | StrictFloat
MAX_STOPS = 16
MAX_PROMPTS = 64  # prompts in one completion request


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class CommonRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: Number = 1.0  # OpenAI's default
    top_p: Number = 1.0
    top_k: StrictInt = 0  # an extension (vLLM's too); 0 or -1: all tokens
    seed: StrictInt | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=MAX_STOPS)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    logprobs: StrictBool | StrictInt | None = None
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    logit_bias: dict[StrictStr, Number] | None = None
    user: StrictStr | None = None

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise RequestError(f"n must be 1 (one choice per prompt), got {self.n}")
        if self.logprobs not in (None, False, 0):
            raise RequestError("logprobs are not supported by this server")
        if self.presence_penalty or self.frequency_penalty:
            raise RequestError("presence_penalty and frequency_penalty are not supported")
        if self.logit_bias:
            raise RequestError("logit_bias is not supported")

    def sampling(self, max_new_tokens: int) -> SamplingParams:
        if self.temperature > 2:  # OpenAI's range; the sampler would take up to 100
            raise RequestError(f"temperature must be in [0, 2], got {self.temperature}")
        return SamplingParams.with_stop(
            self.stop,
            max_new_tokens=max_new_tokens,
            temperature=float(self.temperature),
            top_p=float(self.top_p),
            top_k=0 if self.top_k == -1 else self.top_k,
            seed=self.seed,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(CommonRequest):
    prompt: (
        StrictStr
        | Annotated[list[StrictInt], Field(min_length=1)]
        | Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_PROMPTS)]
        | Annotated[list[list[StrictInt]], Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo or self.suffix or self.best_of not in (None, 1):
            raise RequestError("echo, suffix and best_of are not supported")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: StrictStr | list[TextPart]

    def as_template_input(self) -> dict[str, str]:
        text = self.content
        if not isinstance(text, str):
            text = "".join(part.text for part in text)
        return {"role": self.role, "content": text}


class ChatRequest(CommonRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: StrictInt | None = None
    tools: list[dict] | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise RequestError("tools are not supported by this server")
