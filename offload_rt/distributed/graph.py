"""One Ray Compiled Graph spanning every expert actor, for the per-layer scatter/gather.

InputNode -> one `run_graph.bind` per actor -> MultiOutputNode, compiled once: a layer call
then writes each actor's request into a channel and reads the responses back, skipping Ray's
per-call task submission (about 0.7x the `.remote()` calls' time on the 3-node test cluster).
Ray 2.60 lets an actor sit in one compiled graph at a time, so the one graph holds all actors
and every call visits each of them; an actor with nothing to do gets `NOTHING` and answers it
(one byte, no wire message: Ray 2.60's channels hang on an empty bytes object).

Anything unusual falls back to `.remote()`: a graph that fails to compile is never tried again
(logged once); a graph call that fails (an actor died, its node left, time ran out) tears the
graph down, and the backend recovers the cluster and compiles afresh on a later call, against
the actors it has then.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

log = logging.getLogger(__name__)

NOTHING = b"\x00"  # "no experts of yours this layer", both ways


class GraphCallError(RuntimeError):
    """A compiled-graph layer call that failed; the graph has been torn down."""


class LayerGraph:
    """The compiled graph over the actors `handles` (plan index -> handle), in index order."""

    def __init__(self, buffer_bytes: int, timeout_s: float) -> None:
        self.buffer_bytes = buffer_bytes  # initial channel size; larger requests go .remote()
        self.timeout_s = timeout_s  # one execute and one get
        self.dag = None
        self.order: list[int] = []  # actor index of each graph input and output
        self.disabled = False  # compiling failed once: .remote() for good
        self.compiles = 0
        self.calls = 0  # layer calls answered through the graph
        self.failures = 0

    def ready(self, handles: Mapping[int, object]) -> bool:
        """Whether a layer call can go through the graph; compiles it when there is none."""
        if self.disabled:
            return False
        if self.dag is None:
            self._compile(handles)
        return self.dag is not None

    def stats(self) -> dict[str, int]:
        return {
            "graph_compiles": self.compiles,
            "graph_calls": self.calls,
            "graph_failures": self.failures,
        }

    def fits(self, requests: Mapping[int, bytes]) -> bool:
        return all(len(r) <= self.buffer_bytes for r in requests.values())

    def call(self, requests: Mapping[int, bytes]) -> dict[int, bytes]:
        """Each actor's response to its request (actors not in `requests` get NOTHING), or
        GraphCallError after tearing the graph down."""
        import ray

        try:
            ref = self.dag.execute(*[requests.get(i, NOTHING) for i in self.order])
            values = ray.get(ref, timeout=self.timeout_s)
        except Exception as e:  # whatever broke, the graph's state is unknown: drop it
            self.failures += 1
            self.teardown()
            raise GraphCallError(
                f"compiled-graph layer call failed: {type(e).__name__}: {e}"
            ) from e
        self.calls += 1
        return {i: values[j] for j, i in enumerate(self.order) if i in requests}

    def teardown(self) -> None:
        """Stop the actors' graph loops (bounded by Ray's teardown timeout) so they take
        `.remote()` calls alone, or join a new graph."""
        dag, self.dag = self.dag, None
        if dag is not None:
            try:
                dag.teardown()
            except Exception as e:  # a dead actor's loop cannot be cancelled: nothing to stop
                log.warning("compiled-graph teardown: %s: %s", type(e).__name__, e)

    def _compile(self, handles: Mapping[int, object]) -> None:
        from ray.dag import InputNode, MultiOutputNode

        order = sorted(handles)
        try:
            with InputNode() as inp:
                outs = [handles[i].run_graph.bind(inp[j]) for j, i in enumerate(order)]
            self.dag = MultiOutputNode(outs).experimental_compile(
                _submit_timeout=self.timeout_s, _buffer_size_bytes=self.buffer_bytes
            )
        except Exception as e:  # compiled graphs do not run here: the .remote() path does
            self.disabled = True
            log.warning(
                "Ray Compiled Graph unavailable (%s: %s); expert calls use .remote()",
                type(e).__name__,
                e,
            )
            return
        self.order = order
        self.compiles += 1
