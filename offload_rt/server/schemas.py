"""Request bodies of the OpenAI-compatible endpoints, validated strictly: a wrong type is a
400 that names the field, never a guess ("5" is not 5).

`response_format` (both endpoints): `{"type": "text"}`, `{"type": "json_object"}` (any JSON
object) or `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`; the JSON
ones through constrained decoding (offload_rt/engine/grammar.py), the schema always enforced
whatever `strict` says.

Fields the runtime cannot honour (suffix, best_of > 1, tools) are refused by name rather than
silently ignored; unknown extra fields are ignored, as OpenAI's own server does for forward
compatibility. Beside OpenAI's fields, vLLM's extensions top_k, repetition_penalty,
min_tokens and ignore_eos.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
)

from offload_rt.engine import RequestError, SamplingParams
from offload_rt.engine.logprobs import MAX_TOP_LOGPROBS

Number = StrictInt | StrictFloat
MAX_STOPS = 16
MAX_PROMPTS = 64  # prompts in one completion request
MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # prompts x n in one request: each is a scheduler request
MAX_TOOL_CALLS = 128  # in one assistant message
TopK = Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]

    def schema_text(self) -> str | None:
        return None


class JsonObjectFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["json_object"]

    def schema_text(self) -> str | None:
        return json.dumps(JSON_OBJECT)


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: Annotated[StrictStr, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]  # OpenAI's rule
    description: StrictStr | None = None
    schema_: dict[StrictStr, Any] = Field(alias="schema")  # a JSON object
    strict: StrictBool | None = None  # the schema is always enforced


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec

    def schema_text(self) -> str | None:
        return json.dumps(self.json_schema.schema_)


JSON_OBJECT = {"type": "object"}  # json_object mode: any JSON object
ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")
]


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
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    repetition_penalty: Number = 1.0  # vLLM's extension
    logit_bias: dict[StrictStr, Number] | None = None  # token id (a JSON key) -> bias
    min_tokens: StrictInt = 0  # vLLM's extension
    ignore_eos: StrictBool = False  # vLLM's extension
    response_format: ResponseFormat | None = None
    user: StrictStr | None = None

    def echoes(self) -> bool:
        """Whether the answer holds the prompt (then no new token may be asked for)."""
        return False

    def sampling(
        self, max_new_tokens: int, choice: int, logprobs: int | None, prompt_logprobs: int | None
    ) -> SamplingParams:
        """The parameters of choice `choice` of n: with a seed, choice i samples with
        seed + i (vLLM's rule), so the n choices differ and a rerun repeats them.
        logprobs, prompt_logprobs: top tokens with each new / prompt token (None: none)."""
        if self.temperature > 2:  # OpenAI's range; the sampler would take up to 100
            raise RequestError(f"temperature must be in [0, 2], got {self.temperature}")
        seed = None if self.seed is None else self.seed + choice
        if seed is not None and not 0 <= seed < 2**63:
            raise RequestError(f"seed + n - 1 must lie in [0, 2**63), got seed {self.seed}")
        return SamplingParams.with_stop(
            self.stop,
            max_new_tokens=max_new_tokens,
            temperature=float(self.temperature),
            top_p=float(self.top_p),
            top_k=0 if self.top_k == -1 else self.top_k,
            seed=seed,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            presence_penalty=float(self.presence_penalty),
            frequency_penalty=float(self.frequency_penalty),
            repetition_penalty=float(self.repetition_penalty),
            logit_bias=_bias(self.logit_bias),
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            json_schema=None
            if self.response_format is None
            else self.response_format.schema_text(),
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
    logprobs: TopK | None = None  # the completions form: how many top tokens, 0 to 20
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None

    def refuse_unsupported(self) -> None:
        if self.suffix:
            raise RequestError("suffix is not supported by this server")
        if self.best_of not in (None, 1):
            raise RequestError(f"best_of must be 1 (n gives several choices), got {self.best_of}")
        if len(self.prompts()) * self.n > MAX_CHOICES:
            raise RequestError(
                f"{len(self.prompts())} prompts x n = {self.n} make more than {MAX_CHOICES} "
                "choices in one request"
            )

    def echoes(self) -> bool:
        return self.echo

    def token_logprobs(self) -> int | None:
        """How many top tokens come with each new token's log-probability; None: none."""
        return self.logprobs

    def prompt_logprobs(self) -> int | None:
        """The prompt's own log-probabilities come back with echo and logprobs together."""
        return self.logprobs if self.echo else None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: StrictStr
    arguments: StrictStr  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: StrictStr
    type: Literal["function"] = "function"
    function: CalledFunction

    def as_template_input(self) -> dict[str, Any]:
        """As transformers' chat templates take a call: its arguments a mapping when they
        are a JSON object (templates write them with tojson), else the text as sent."""
        try:
            args: Any = json.loads(self.function.arguments)
        except ValueError:
            args = None
        if not isinstance(args, dict):
            args = self.function.arguments
        return {"id": self.id, "type": self.type,
                "function": {"name": self.function.name, "arguments": args}}  # fmt: skip


class ChatMessage(BaseModel):
    """A message as OpenAI's chat takes it, passed to the checkpoint's chat template, which
    decides which roles and fields it can render (and refuses the others with a 400)."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None  # None: an assistant's tool calls only
    name: StrictStr | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOL_CALLS)] | None = None
    tool_call_id: StrictStr | None = None  # a tool message: the call it answers

    @model_validator(mode="after")
    def _fields_of_the_role(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"{self.role} messages need content")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError(f"tool_calls belong to assistant messages, not {self.role}")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    def as_template_input(self) -> dict[str, Any]:
        text = self.content or ""
        if not isinstance(text, str):
            text = "".join(part.text for part in text)
        out: dict[str, Any] = {"role": self.role, "content": text}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls is not None:
            out["tool_calls"] = [call.as_template_input() for call in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class ChatRequest(CommonRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: StrictInt | None = None
    tools: list[dict] | None = None
    logprobs: StrictBool = False  # the chat form: a flag, and top_logprobs says how many
    top_logprobs: TopK | None = None

    def refuse_unsupported(self) -> None:
        if self.tools:
            raise RequestError("tools are not supported by this server")
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs: true")

    def token_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def _bias(bias: dict[str, float | int] | None) -> dict[int, float]:
    """OpenAI's logit_bias: JSON object keys are strings that spell token ids."""
    out = {}
    for key, value in (bias or {}).items():
        if not key.strip().lstrip("-").isdigit() or len(key) > 12:
            raise RequestError(f"logit_bias keys must be token ids, got {key[:40]!r}")
        out[int(key)] = float(value)
    return out
