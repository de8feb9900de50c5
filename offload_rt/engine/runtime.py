"""The public model object: `offload_rt.load(...)` returns an `OffloadModel`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from offload_rt.analysis.recorder import RoutingRecorder
from offload_rt.analysis.traces import RoutingTrace
from offload_rt.checkpoint import Checkpoint
from offload_rt.config import DEFAULT_GROUP_SIZE
from offload_rt.distributed.cluster import RayOptions
from offload_rt.engine.densequant import dense_quant_config, on_huge_pages, quantize_dense
from offload_rt.engine.generate import GenerationResult, generate
from offload_rt.engine.grammar import Grammars
from offload_rt.engine.hybrid import GIB, Placement, local_placement
from offload_rt.engine.loader import (
    BACKENDS,
    local_backend,
    ray_backend,
    resolve_device,
    resolve_dtype,
)
from offload_rt.engine.sampling import RequestError, SamplingParams
from offload_rt.engine.tokenizer import TextTokenizer
from offload_rt.experts import LocalExpertBackend, OffloadOptions
from offload_rt.experts.policies import DEFAULT_POLICY, runtime_policy
from offload_rt.hub import resolve_model
from offload_rt.model import DecoderModel
from offload_rt.model.interface import PREDICT_FROM
from offload_rt.model.moe import ExpertBackend
from offload_rt.models import build_model, open_checkpoint

Prompt = str | Sequence[int]


class ModelBackend(ExpertBackend, Protocol):
    """An expert backend the model owns: counters to report, resources to release."""

    def stats(self) -> dict[str, int | float]: ...

    def close(self) -> None: ...


class OffloadModel:
    def __init__(
        self,
        ckpt: Checkpoint,
        model: DecoderModel,
        backend: ModelBackend,
        tokenizer: TextTokenizer | None,
        on_close: Callable[[], None] | None = None,
        recorder: RoutingRecorder | None = None,
        placement: Placement | None = None,
    ) -> None:
        self.checkpoint = ckpt
        self.config = ckpt.config
        self.model = model
        self.backend = backend
        self.tokenizer = tokenizer
        # JSON schemas compiled against the tokenizer, for json_schema (constrained decoding)
        self.grammars = (
            None
            if tokenizer is None
            else Grammars(tokenizer.tokenizer, self.config.vocab_size, self.config.eos_token_ids)
        )
        self.on_close = on_close
        self.recorder = recorder  # the model's view of its backend when routing is recorded
        # local backend: the device slots, their budget and the hybrid plan, when asked for
        self.placement = placement
        self.closed = False

    @property
    def device(self) -> torch.device:
        return self.model.device

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(
                    f"{self.checkpoint.folder} has no tokenizer.json: give token ids, not text"
                )
            return self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise RequestError("a prompt is a string or a list of integer token ids")
        return ids

    def logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Logits (len, V) of one sequence, computed from scratch (no cache reused)."""
        self._check_open()
        ids = self.encode(token_ids)
        if not ids or len(ids) > self.config.max_position_embeddings:
            raise RequestError(
                f"logits needs 1 to {self.config.max_position_embeddings} tokens, got {len(ids)}"
            )
        with torch.inference_mode():
            hidden = self.model.forward(
                torch.tensor([ids], device=self.device),
                torch.arange(len(ids), device=self.device)[None],
                self.model.new_cache(1, len(ids)),
                kv_len=len(ids),
                start=0,
            )
            return self.model.logits(hidden[0])

    def generate(
        self,
        prompt: Prompt | Sequence[Prompt],
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | int | Sequence[str | int] | None = None,
        **options: Any,
    ) -> GenerationResult | list[GenerationResult]:
        """One prompt (text or token ids) gives one result; a list of prompts, a list.
        options: the other fields of `SamplingParams`: logprobs, prompt_logprobs,
        presence_penalty, frequency_penalty, repetition_penalty, logit_bias, min_tokens,
        ignore_eos, json_schema (a dict or its JSON text: the output follows it)."""
        self._check_open()
        batch = _is_batch(prompt)
        prompts = [self.encode(p) for p in (prompt if batch else [prompt])]
        if not prompts:
            raise RequestError("the batch of prompts is empty")
        params = SamplingParams.with_stop(
            stop,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            **options,
        )
        decode = self.tokenizer.decode if self.tokenizer is not None else None
        eos = self.config.eos_token_ids
        results = generate(self.model, prompts, [params] * len(prompts), eos, decode, self.grammars)
        return results if batch else results[0]

    def warm(self) -> int:
        """Load every expert once through the backend (one zero token each), so the first
        tokens do not pay for the loads; with a capped cache the last ones used stay resident.
        Returns the experts resident afterwards."""
        self._check_open()
        grid = self.model.grid
        x = torch.zeros(
            1, self.config.hidden_size, dtype=self.model.dtype, device=self.model.device
        )
        layers = tqdm(grid.layers, desc="loading experts", unit="layer", disable=None)
        with torch.inference_mode():
            for layer in layers:
                self.backend.run({key: x for key in grid.layer_keys(layer)})
        return int(self.stats()["resident"])

    def routing_trace(self) -> RoutingTrace:
        """Every complete forward pass's experts so far (`load(record_routing=True)`); the
        first pass of the first `generate` is the prompt."""
        if self.recorder is None:
            raise ValueError("routing is recorded only when loaded with record_routing=True")
        return self.recorder.trace()

    def stats(self) -> dict[str, int | float]:
        return self.backend.stats()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.backend.close()
            self.checkpoint.close()
            if self.on_close is not None:
                self.on_close()

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this model is closed")

    def __enter__(self) -> OffloadModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _prefetch_pays(capped: bool, device: torch.device, link: float | None) -> bool:
    """The default of `prefetch`: on for a capped cache (fewer slots than the experts on the
    device side) behind a link. On a CPU device with no link the slots are the same RAM the
    experts load from, a speculative load is a 35 MB memcpy competing with compute for the
    cores, and prefetch measured 17% slower (104.5 against 126.5 ms a token, bench_local's
    model, cache 16/64, 2 cores)."""
    return capped and (device.type != "cpu" or link is not None)


def _ray_gpu_bytes(gpu_memory_gb: float) -> int:
    if isinstance(gpu_memory_gb, bool) or not isinstance(gpu_memory_gb, (int, float)):
        raise ValueError(f"gpu_memory_gb must be a number of GiB, got {gpu_memory_gb!r}")
    if not gpu_memory_gb > 0:
        raise ValueError(f"gpu_memory_gb must be positive, got {gpu_memory_gb}")
    return int(gpu_memory_gb * GIB)


def _check_predict_from(prefetch_from: str) -> None:
    if prefetch_from not in PREDICT_FROM:
        raise ValueError(f"prefetch_from must be one of {PREDICT_FROM}, got {prefetch_from!r}")


def _is_batch(prompt: object) -> bool:
    if isinstance(prompt, str):
        return False
    items = list(prompt)  # type: ignore[call-overload]
    return bool(items) and not isinstance(items[0], int)


def load(
    path: str | Path,
    backend: str = "local",
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    cache_experts: int | None = None,
    host_experts: int | None = None,
    ray_address: str | None = None,
    expert_actors: int | None = None,
    ray_options: RayOptions | None = None,
    link_gbps: float | None = None,
    prefetch: bool | None = None,
    prefetch_from: str = "both",
    compute_on_miss: bool = False,
    cache_policy: str = DEFAULT_POLICY,
    record_routing: bool = False,
    dense_quant: str | None = None,
    gpu_memory_gb: float | None = None,
    cpu_experts: int | str | None = None,
    cpu_moe_layers: int | None = None,
    routing_trace: str | Path | None = None,
    lm_head_quant: str | None = None,
) -> OffloadModel:
    """Open a Hugging Face checkpoint folder of a supported family (`offload_rt.models`), or
    a hub id `org/name[@revision]` (`offload_rt.hub`: downloaded once into the hub cache,
    honouring HF_HOME, HF_TOKEN and HF_HUB_OFFLINE; an existing folder always wins).

    backend: "local" (experts in this process) or "ray" (experts in Ray actors).
    cache_experts: local backend: the most experts resident on the device at once, over all
    layers (None: all). host_experts: packed experts kept in (pinned) host RAM when the device
    is a GPU (None: all). ray_address: None starts or joins a local Ray, "auto" joins the
    running cluster, or an address. expert_actors: None: one per GPU, or one per node without
    GPUs. ray_options: timeouts, restarts, memory shares (`RayOptions`). link_gbps: local
    backend: hold every host->device expert move to bytes / (link_gbps GB/s) and keep a host
    tier even on a CPU device — a PCIe link simulated on a machine without a GPU.
    prefetch: local backend: while layer L runs, apply layer L+1's router to the hidden state
    and start loading the experts it picks (None: on when the cache is capped behind a link,
    a GPU or link_gbps);
    prefetch_from: where that guess is made, "attention" (after L's attention), "moe" (after
    L's MoE output) or "both". compute_on_miss: local backend behind a link (a GPU, or
    link_gbps): run a missing expert on the CPU from host RAM when a cost model says that
    beats copying it. cache_policy: local backend: which resident expert a miss evicts,
    "lru", "lfu", "lrfu" or "markov" (`offload_rt/experts/policies.py`, the simulator's own).
    None of these changes an output. record_routing: keep every layer call's experts, for
    `OffloadModel.routing_trace()` (`offload-rt generate --trace`). dense_quant: "int8" or
    "int4" quantizes attention, dense MLPs and lm_head at load into the experts' affine format
    (groups of 64; `engine/densequant.py`), as llama.cpp does; this one changes outputs.
    lm_head_quant: with dense_quant, lm_head in this format instead ("int8": as precise as
    llama.cpp's q4_0 files keep it, in q6_K, or more).
    gpu_memory_gb: GiB of device memory the model may use: local backend: its dense weights,
    a KV/activation reserve and expert slots in the rest (instead of cache_experts); ray: each
    GPU actor's, all for expert slots. cpu_experts: local backend behind a link: a fixed set
    of experts computed on the CPU from host RAM and never loaded, "auto" (the planner's
    choice by a cost model measured at load), or N per MoE layer (the least used);
    cpu_moe_layers: every expert of the first N MoE layers (llama.cpp's --n-cpu-moe);
    routing_trace: a recorded trace (`--trace`) whose expert frequencies the planner uses
    (else uniform routing). `OffloadModel.placement.plan` holds the plan; outputs do not
    change.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {BACKENDS}")
    local_only = {
        "cache_experts": cache_experts is not None,
        "link_gbps": link_gbps is not None,
        "prefetch": bool(prefetch),
        "compute_on_miss": compute_on_miss,
        "cache_policy": cache_policy != DEFAULT_POLICY,
        "cpu_experts": cpu_experts is not None,
        "cpu_moe_layers": cpu_moe_layers is not None,
        "routing_trace": routing_trace is not None,
    }
    if backend == "ray" and any(local_only.values()):
        named = ", ".join(k for k, v in local_only.items() if v)
        raise ValueError(
            f"{named}: these apply to the local backend; the ray backend sizes each actor's "
            "cache from the placement plan (see `offload-rt plan`)"
        )
    _check_predict_from(prefetch_from)
    if host_experts is not None and (not isinstance(host_experts, int) or host_experts < 0):
        raise ValueError(f"host_experts must be a non-negative integer, got {host_experts!r}")
    runtime_policy(cache_policy, 1)  # an unknown name fails before anything is read
    dense = None if dense_quant is None else dense_quant_config(dense_quant, DEFAULT_GROUP_SIZE)
    if lm_head_quant is not None and dense is None:
        raise ValueError("lm_head_quant needs dense_quant (it changes lm_head's format only)")
    head = None
    if lm_head_quant is not None:
        head = dense_quant_config(lm_head_quant, DEFAULT_GROUP_SIZE, "lm_head_quant")
    dev = resolve_device(device)
    ckpt = open_checkpoint(resolve_model(path))
    on_close = None
    experts: ModelBackend | None = None
    placement = None
    try:
        dt = resolve_dtype(dtype, ckpt)
        tokenizer = TextTokenizer.from_folder(ckpt.folder)
        if backend == "local":
            placement = local_placement(
                ckpt,
                dev,
                dt,
                cache_experts,
                gpu_memory_gb,
                cpu_experts,
                cpu_moe_layers,
                link_gbps,
                compute_on_miss,
                routing_trace,
            )
            cpu = placement.plan.cpu if placement.plan is not None else frozenset()
            if prefetch is None:
                on_device = ckpt.config.num_experts_total - len(cpu)
                prefetch = _prefetch_pays(placement.slots < on_device, dev, link_gbps)
            options = OffloadOptions(prefetch, compute_on_miss, prefetch_from, cpu)
            experts = local_backend(
                ckpt, dev, dt, placement.slots, host_experts, link_gbps, options, cache_policy
            )
        else:
            opts = ray_options or RayOptions()
            opts = replace(
                opts,
                address=ray_address if ray_address is not None else opts.address,
                expert_actors=expert_actors if expert_actors is not None else opts.expert_actors,
                host_experts=host_experts if host_experts is not None else opts.host_experts,
            )
            if gpu_memory_gb is not None:
                opts = replace(opts, gpu_memory_bytes=_ray_gpu_bytes(gpu_memory_gb))
            experts, on_close = ray_backend(ckpt, dt, opts)
        prefetcher = experts.prefetcher if isinstance(experts, LocalExpertBackend) else None
        grid = ckpt.config.grid
        recorder = (
            RoutingRecorder(experts, len(grid.layers), grid.experts) if record_routing else None
        )
        model = build_model(ckpt, dev, dt, recorder or experts, prefetcher)
        if dense is not None:
            model.weights = quantize_dense(model.weights, dense, head)
        if dev.type == "cpu":
            model.weights = on_huge_pages(model.weights)
    except BaseException:
        if experts is not None:
            experts.close()
        if on_close is not None:
            on_close()
        ckpt.close()
        raise
    return OffloadModel(ckpt, model, experts, tokenizer, on_close, recorder, placement)
