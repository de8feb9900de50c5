"""Routing traces: which experts each forward pass used in each layer.

Two on-disk forms, told apart by their first byte:
  * text, the format of `../shared/data/mixtral-8x7b-routing-trace.txt` (published as
    `active_experts.txt` in h39s/mlsys): one line per (forward pass, layer), `num_layers` lines
    per pass, layers in order, each line the comma-separated expert ids that layer used. It does
    not mark prompt passes; by its convention the first pass is the prompt.
  * msgpack, written by `write_trace`: one map tagged with `FORMAT` and `VERSION`, read back
    with size limits so that a corrupt or hostile file cannot make the reader allocate
    unbounded memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack

from offload_rt.model.moe import ExpertKey

FORMAT = "offload_rt.routing_trace"
VERSION = 1
MAX_TRACE_BYTES = 256 * 2**20  # 256 MiB: over a million passes of a 32-layer top-2 model
MAX_ARRAY_LEN = 16 * 2**20  # longest msgpack array accepted (the list of passes)
MAX_MAP_LEN = 16  # the trace map has 6 fields
MAX_STR_LEN = 256  # field names and the format tag

Pass = tuple[tuple[int, ...], ...]  # one forward pass: per layer, the expert ids it used


class TraceError(ValueError):
    """A trace file or trace value that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class RoutingTrace:
    num_layers: int  # decoder layers per forward pass
    num_experts: int  # experts per layer; ids run 0 .. num_experts - 1
    passes: tuple[Pass, ...]  # per forward pass, per layer: expert ids used, ascending
    prompt_passes: frozenset[int] = frozenset({0})  # indices of passes that are prompts

    def is_prompt(self, index: int) -> bool:
        return index in self.prompt_passes

    @property
    def decode_passes(self) -> int:
        return len(self.passes) - len(self.prompt_passes)

    def step(self, index: int, layer: int) -> int:
        """The clock of the simulator and the policies: one tick per (pass, layer)."""
        return index * self.num_layers + layer

    def without_prompts(self) -> RoutingTrace:
        """The decode passes alone, as if the cache started empty after the prompt."""
        passes = tuple(p for i, p in enumerate(self.passes) if not self.is_prompt(i))
        return RoutingTrace(self.num_layers, self.num_experts, passes, frozenset())

    def keys(self, index: int, layer: int) -> tuple[ExpertKey, ...]:
        """The experts pass `index` used in `layer`, as typed keys."""
        return tuple(ExpertKey(layer, e) for e in self.passes[index][layer])

    def steps(self) -> Iterator[tuple[int, int, tuple[ExpertKey, ...]]]:
        """(pass index, layer, experts used) in execution order: pass by pass, layer by layer."""
        for index in range(len(self.passes)):
            for layer in range(self.num_layers):
                yield index, layer, self.keys(index, layer)

    def check(self, source: str) -> RoutingTrace:
        """Raise TraceError naming `source` unless every field is consistent; returns self."""
        if self.num_layers < 1 or self.num_experts < 1:
            raise TraceError(
                f"{source}: num_layers {self.num_layers} and num_experts {self.num_experts} "
                "must both be at least 1"
            )
        for index, one_pass in enumerate(self.passes):
            if len(one_pass) != self.num_layers:
                raise TraceError(
                    f"{source}: pass {index} has {len(one_pass)} layers, expected {self.num_layers}"
                )
            for layer, experts in enumerate(one_pass):
                where = f"{source}: pass {index} layer {layer}"
                _check_experts(experts, self.num_experts, where)
        bad = sorted(i for i in self.prompt_passes if not 0 <= i < len(self.passes))
        if bad:
            raise TraceError(f"{source}: prompt passes {bad} outside 0..{len(self.passes) - 1}")
        return self


def _check_experts(experts: tuple[int, ...], num_experts: int, where: str) -> None:
    if not experts:
        raise TraceError(f"{where}: no experts listed")
    out = [e for e in experts if not 0 <= e < num_experts]
    if out:
        raise TraceError(f"{where}: expert ids {out} outside 0..{num_experts - 1}")
    if len(set(experts)) != len(experts):
        raise TraceError(f"{where}: expert ids {list(experts)} repeat")


def _parse_line(text: str, num_experts: int, where: str) -> tuple[int, ...]:
    try:
        experts = tuple(sorted(int(field) for field in text.split(",")))
    except ValueError:
        raise TraceError(f"{where}: expected comma-separated expert ids, got {text!r}") from None
    _check_experts(experts, num_experts, where)
    return experts


def parse_text_trace(
    text: str, source: str, num_layers: int = 32, num_experts: int = 8, prompt_passes: int = 1
) -> RoutingTrace:
    """Parse the shared text format; `source` names the file in errors ("file:line: ...")."""
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()  # trailing blank lines only; a blank line inside is an error
    if not lines or len(lines) % num_layers:
        raise TraceError(
            f"{source}: {len(lines)} lines is not a positive multiple of {num_layers} "
            f"(one line per layer, {num_layers} layers per forward pass)"
        )
    rows = [_parse_line(line, num_experts, f"{source}:{n}") for n, line in enumerate(lines, 1)]
    passes = tuple(tuple(rows[i : i + num_layers]) for i in range(0, len(rows), num_layers))
    if not 0 <= prompt_passes <= len(passes):
        raise TraceError(f"{source}: prompt_passes {prompt_passes} outside 0..{len(passes)}")
    return RoutingTrace(num_layers, num_experts, passes, frozenset(range(prompt_passes)))


def read_text_trace(
    path: str | Path, num_layers: int = 32, num_experts: int = 8, prompt_passes: int = 1
) -> RoutingTrace:
    """Read the shared text format (see the module docstring); the first pass is the prompt."""
    path = Path(path)
    text = _read_bytes(path).decode("utf-8", errors="replace")
    return parse_text_trace(text, str(path), num_layers, num_experts, prompt_passes)


def _read_bytes(path: Path) -> bytes:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise TraceError(f"{path}: cannot read trace ({e.strerror})") from e
    if size > MAX_TRACE_BYTES:
        raise TraceError(f"{path}: {size} bytes is over the {MAX_TRACE_BYTES}-byte trace limit")
    return path.read_bytes()


def trace_to_dict(trace: RoutingTrace) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "num_layers": trace.num_layers,
        "num_experts": trace.num_experts,
        "prompt_passes": sorted(trace.prompt_passes),
        "passes": [[list(experts) for experts in one_pass] for one_pass in trace.passes],
    }


def trace_from_dict(data: object, source: str) -> RoutingTrace:
    """Build and check a trace from the map `trace_to_dict` makes; errors name `source`."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TraceError(f"{source}: not an offload_rt routing trace (no format tag {FORMAT!r})")
    if data.get("version") != VERSION:
        raise TraceError(f"{source}: trace version {data.get('version')!r}, expected {VERSION}")
    try:
        passes = tuple(
            tuple(tuple(int(e) for e in experts) for experts in p) for p in data["passes"]
        )
        trace = RoutingTrace(
            num_layers=int(data["num_layers"]),
            num_experts=int(data["num_experts"]),
            passes=passes,
            prompt_passes=frozenset(int(i) for i in data["prompt_passes"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise TraceError(f"{source}: malformed trace field ({type(e).__name__}: {e})") from e
    return trace.check(source)


def write_trace(path: str | Path, trace: RoutingTrace) -> None:
    """Write `trace` as msgpack (the form `offload-rt generate --trace` records)."""
    trace.check(str(path))
    Path(path).write_bytes(msgpack.packb(trace_to_dict(trace), use_bin_type=True))


def _unpack(data: bytes, source: str) -> object:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            max_str_len=MAX_STR_LEN,
            max_bin_len=0,
            max_ext_len=0,
            max_array_len=MAX_ARRAY_LEN,
            max_map_len=MAX_MAP_LEN,
        )
    except (ValueError, msgpack.UnpackException) as e:
        raise TraceError(f"{source}: corrupt msgpack trace ({type(e).__name__}: {e})") from e


def _looks_like_msgpack(data: bytes) -> bool:
    # a msgpack map starts with a fixmap (0x80-0x8f), map16 (0xde) or map32 (0xdf) byte;
    # the text format starts with a digit
    return bool(data) and (0x80 <= data[0] <= 0x8F or data[0] in (0xDE, 0xDF))


def read_trace(
    path: str | Path, num_layers: int = 32, num_experts: int = 8, prompt_passes: int = 1
) -> RoutingTrace:
    """Read a msgpack trace or a text trace, whichever the file holds. The keyword arguments
    describe a text trace only; a msgpack trace carries its own."""
    path = Path(path)
    data = _read_bytes(path)
    if _looks_like_msgpack(data):
        return trace_from_dict(_unpack(data, str(path)), str(path))
    text = data.decode("utf-8", errors="replace")
    return parse_text_trace(text, str(path), num_layers, num_experts, prompt_passes)
