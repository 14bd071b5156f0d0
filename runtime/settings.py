"""One config for every tandem service: `ClusterConfig`, from file < env < CLI flags.

    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)           # --config PATH plus one flag per field
    config = settings.from_args(parser.parse_args())

Sources, later ones winning: the dataclass defaults; a YAML or JSON file (`--config` or
`TANDEM_CONFIG`) holding a flat mapping of field names; env vars `TANDEM_<FIELD>` (e.g.
`TANDEM_NAMESPACE`, `TANDEM_ETCD_ENDPOINTS=h1:2379,h2:2379`); CLI flags (`--namespace`).
Every field gets its env var and flag from its name, so adding a field with a default and a
`help` is all it takes. The config is validated when built and never mutated afterwards;
make variants with `dataclasses.replace`. Defaults bind 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

AUTO_GPU_MEMORY_FRACTION = 0.9  # a worker alone on its GPU, kv_cache_gib 0: the share its KV cache sizes to
# A CPU prefill worker's step budget by default (prefill_max_num_batched_tokens 0). At concurrency 8 on
# two cores (256-token prompts) it batched every queued prompt into one 1.3-1.9k-token step of 1-2 s,
# and the decode worker got them all at its end: TTFT mean 913-1099 -> 453-488 ms, out tok/s
# 160-165 -> 186-231 with 512 (docs/architecture.md).
CPU_PREFILL_STEP_TOKENS = 512
ENV_PREFIX = "TANDEM_"
CONFIG_ENV = "TANDEM_CONFIG"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]*$")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(ValueError):
    """A config value is missing, malformed or inconsistent; the message names it and its source."""


def check_name(kind: str, value: str) -> str:
    """Validate an etcd key segment (namespace, role, worker id): no '/', not empty."""
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise ValueError(f"bad {kind} {value!r}: use letters, digits and _ . : @ - (no '/')")
    return value


def split_endpoint(endpoint: str) -> tuple[str, bool]:
    """'host:port', 'http://host:port' or 'https://host:port' -> ('host:port', is_https)."""
    is_https = endpoint.startswith("https://")
    target = endpoint.split("://", 1)[-1].rstrip("/")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad etcd endpoint {endpoint!r}: expected host:port")
    return target, is_https


def _field(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """Settings shared by every process of one tandem cluster."""

    namespace: str = _field("default", "cluster namespace: etcd keys live under /tandem/{namespace}/")
    etcd_endpoints: tuple[str, ...] = _field((), "etcd host:port list; empty starts an embedded etcd")
    etcd_user: str | None = _field(
        None, "etcd user (its password: TANDEM_ETCD_PASSWORD or etcd_password_file); with an embedded etcd, "
        "auth is turned on and this user made at its start")
    etcd_password: str | None = dataclasses.field(default=None, repr=False, metadata={
        "help": "etcd password: env or config file only (a flag would show it to ps)", "secret": True})
    etcd_password_file: str | None = _field(None, "file whose first line is the etcd password")
    etcd_ca_file: str | None = _field(
        None, "CA (PEM) that signed etcd's TLS certificate: connect to etcd with TLS (an embedded etcd serves "
        "TLS with etcd_cert_file and takes only clients with a certificate of this CA)")
    etcd_cert_file: str | None = _field(None, "client certificate (PEM) for an etcd that asks for one")
    etcd_key_file: str | None = _field(None, "private key (PEM) of etcd_cert_file")
    lease_ttl_s: int = _field(10, "etcd lease TTL: a dead process's keys vanish within this")
    metrics_interval_s: float = _field(1.0, "how often workers write their metrics key")
    host: str = _field("127.0.0.1", "address the services bind")
    port: int = _field(8000, "the router's OpenAI HTTP port")
    grpc_port: int = _field(8001, "the router's KServe gRPC port")
    metrics_port: int = _field(0, "Prometheus /metrics port of this process (0 picks a free one)")
    model: str = _field("", "model to serve (empty: the engine's default model)")
    log_level: str = _field("INFO", "log level: DEBUG, INFO, WARNING, ERROR")
    # -- engine (every worker) --
    dtype: str = _field("bfloat16", "weights and KV dtype: bfloat16, float16, float32")
    device: str = _field("cpu", "torch device of the workers: cpu, cuda, cuda:N")
    threads: int = _field(0, "CPU threads per worker (0: the cores shared between the workers, one left to the router)")
    prefill_threads: int = _field(
        0, "CPU threads of a step that prefills 64 tokens or more, bfloat16 (0: the cores per worker)")
    idle_prefill_threads: int = _field(
        0, "CPU threads of such a step while no other worker sharing cpu_share_dir has work (0: prefill_threads)")
    cpu_share_dir: str = _field(
        "", "CPU: a directory the workers of one machine share to say whether their engine has work "
        "(engine/cpu_share.py; tandem serve sets one)")
    block_size: int = _field(16, "tokens per KV block (router and workers must agree)")
    kv_cache_gib: float = _field(
        0.0, "KV cache per worker, GiB (0: sized from the device: 1 GiB on the CPU; on a GPU, the worker's share of "
        "its memory (gpu_memory_fraction; else 0.9 of the GPU, or of its part with a fractional num_gpus_per_worker) "
        "less the weights and a step's working memory)")
    prefill_kv_cache_gib: float = _field(0.0, "KV cache of a prefill worker, GiB (0: kv_cache_gib)")
    host_kv_cache_gib: float = _field(
        0.0, "host memory per worker for the KV cache's host tier, GiB (0: off): blocks the KV cache evicts "
        "are kept there and copied back on a prefix hit instead of recomputed (pinned on a GPU, ~50 GB/s "
        "over PCIe Gen5). Set it where long shared prefixes come back after the cache evicted them "
        "(multi-turn chat, agents, the Mooncake trace): the host RAM you can spare over the workers of the "
        "machine, several times kv_cache_gib to matter; pinning it takes seconds per 10 GiB at the start")
    gpu_memory_fraction: float = _field(
        0.0, "most of its GPU's memory one worker may allocate (0: no cap, and the KV cache sizes itself to 0.9 "
        "of it); tandem serve splits 0.9 of one GPU between its workers when they share it")
    enable_prefix_caching: bool = _field(True, "reuse cached prompt blocks across requests")
    max_num_seqs: int = _field(256, "most requests a worker runs at once")
    max_num_batched_tokens: int = _field(2048, "token budget of one engine step")
    prefill_max_num_batched_tokens: int = _field(
        0, f"token budget of a prefill worker's engine step (0: at most {CPU_PREFILL_STEP_TOKENS} on the CPU, where "
        "one step of every queued prompt kept the first of them from the decode tier; else max_num_batched_tokens)")
    engine: str = _field("torch", "engine backend: torch (run the model) or sim (a fitted timing model stands in)")
    sim_profile: str = _field("", "sim engine: timing profile name (engine/sim_profiles) or .json path; empty: default")
    async_scheduling: str = _field(
        "auto", "plan and launch step N+1 before step N's tokens reach the host: auto (on with CUDA), on, off"
    )
    joining_prefill_tokens: int = _field(
        0, "decode worker: most prompt tokens one step computes while handed-off prompts' KV is on its way or just "
        "landed (their first decode waits for that step); 0: no cap")
    gpu_share: bool = _field(
        False, "a prefill and a decode worker on one GPU (CUDA): the prefill worker's forwards yield to the decode "
        "step that carries a handed-off request's first decode (a shared-memory flag per GPU: engine/gpu_share.py; "
        "off: on one H200 it cut that gap by a third at concurrency 16 and raised TTFT by more than a third)")
    batch_invariant: bool = _field(
        False, "CUDA: batch-invariant (deterministic) mode: a request's greedy tokens and logprobs have the same bits "
        "whatever requests share its engine steps (alone or under load, aggregated or disaggregated): the "
        "projections and LM head on one fixed Triton matmul per weight, fixed decode-attention splits; costs "
        "decode and prefill speed (docs/architecture.md, \"Batch-invariant mode\"); 16-bit dtypes only. The CPU "
        "kernels are batch-invariant already")
    # -- KV transfer (prefill -> decode) --
    transport: str = _field(
        "auto", "KV transport: auto (per peer, the fastest measured: kv_transfer/default_table.json), "
        "nixl, cuda_ipc, nccl (pair groups met through etcd), tcp, loopback (one process)")
    kv_transfer_mode: str = _field(
        "auto", "who moves a prompt's KV: auto (what the transport measured faster), push (the prefill "
        "worker writes), pull (the decode worker reads)")
    kv_lease_s: float = _field(30.0, "how long a prefill worker holds a prompt's KV blocks nobody came for")
    kv_pull_timeout_s: float = _field(10.0, "a KV transfer slower than this is abandoned: decode recomputes")
    # -- router --
    mode: str = _field("disaggregated", "serving mode: disaggregated or aggregated")
    max_local_prefill_tokens: int = _field(
        64, "prompts needing more new tokens than this are prefilled on the prefill tier"
    )
    suffix_prefill: str = _field(
        "auto", "disaggregated: a prompt its decode worker would finish itself (max_local_prefill_tokens) goes to a "
        "prefill worker that gets to it as soon (holding as much of its prefix, no more queued) while the decode "
        "worker has requests decoding, so that no decode step carries the suffix; only its blocks move: auto (on "
        "with the CPU torch engine, where such a step took 3-4 decode steps), on, off (router/policy.py)")
    first_token_hold: str = _field(
        "auto", "router: a handed-off request's first token (the prefill worker's) waits for the decode worker's first "
        "and goes out with it: auto (when the predicted KV handoff and decode step exceed itl_slo_ms and the wait "
        "keeps the TTFT within ttft_slo_ms), on (every handoff, within ttft_slo_ms), off (sent at once)")
    max_body_bytes: int = _field(4 << 20, "largest HTTP request body the router accepts")
    http_read_timeout_s: float = _field(
        15.0, "HTTP: a request's head must arrive within this of its first byte (or of the connection), and "
        "its body within this of the head; past it 408 and the connection is closed (slow-loris clients)")
    routing_policy: str = _field("kv", "worker choice: kv (KV-aware cost), round_robin, random, least_loaded")
    kv_events: bool = _field(True, "index workers' KV events (--no-kv-events: predict from past routing, with a TTL)")
    kv_index_ttl_s: float = _field(120.0, "without KV events: how long a routed prompt counts as cached there")
    router_temperature: float = _field(0.0, "kv policy: 0 picks the lowest cost; > 0 samples softmax(-cost/T)")
    prefill_load_scale: float = _field(
        32.0, "kv policy: weight of a prefill block against an active decode block (router/policy.py says why 32)"
    )
    served_model_name: str = _field("", "model name clients use (empty: derived from --model)")
    # One pair of SLO targets: the router's attainment and the dashboard, and the planner's targets.
    ttft_slo_ms: float = _field(2000.0, "SLO target: time to first token, ms (the router's attainment, the "
                                "dashboard, the planner)")
    itl_slo_ms: float = _field(50.0, "SLO target: a request's mean inter-token latency, ms (the router, the planner)")
    # -- router: admission, API keys, TLS, hung workers (README "Security") --
    max_queued_requests: int = _field(
        1024, "admission: most requests queued (routed, no first token yet) per tier; past it 429 (0: no bound)")
    max_queued_tokens: int = _field(
        1 << 20, "admission: most prompt tokens queued per tier; past it 429 (0: no bound)")
    api_keys: tuple[str, ...] = _field(
        (), "API keys clients must send (HTTP Bearer, gRPC authorization metadata); empty: no keys asked "
        "(prefer TANDEM_API_KEYS to a flag)")
    public_paths: tuple[str, ...] = _field(
        ("/health", "/metrics", "/metrics/targets", "/dashboard", "/dashboard/data"),
        "HTTP paths served without a key when api_keys are set")
    rate_limit_rpm: int = _field(0, "requests per minute one API key may make (0: no limit)")
    rate_limit_tpm: int = _field(0, "prompt + generated tokens per minute one API key may use (0: no limit)")
    tls_cert_file: str | None = _field(None, "router: certificate (PEM) to serve HTTPS and gRPC over TLS")
    tls_key_file: str | None = _field(None, "router: private key (PEM) of tls_cert_file")
    tls_client_ca_file: str | None = _field(None, "router: CA bundle clients' certificates must chain to (mTLS)")
    # -- internal gRPC: workers, launcher service (README "Security") --
    internal_tls_ca_file: str | None = _field(
        None, "internal gRPC mutual TLS: the cluster's CA (PEM); servers take only clients with a certificate "
        "it signed, clients only servers with one (tandem certs makes them; off: plaintext)")
    internal_tls_cert_file: str | None = _field(None, "internal gRPC mutual TLS: this process's certificate (PEM)")
    internal_tls_key_file: str | None = _field(None, "internal gRPC mutual TLS: this process's private key (PEM)")
    worker_silence_s: float = _field(
        5.0, "a worker call silent this long (twice that mid-stream, at least 4x the worker's recent gaps), "
        "its worker heard nowhere else, is checked with a Health probe; a worker that fails it is failed over")
    worker_probe_timeout_s: float = _field(2.0, "how long the hung-worker Health probe waits")
    # -- deployment (launchers: tandem deploy) --
    num_routers: int = _field(1, "deploy: router replicas")
    num_prefill: int = _field(1, "deploy: prefill workers (disaggregated mode)")
    num_decode: int = _field(1, "deploy: decode workers")
    planner: bool = _field(False, "deploy: run the planner as a service")
    tensor_parallel_size: int = _field(1, "GPUs one worker's model is split across (all on one node)")
    num_gpus_per_worker: float = _field(
        -1.0, "deploy: GPUs a worker reserves (-1: tensor_parallel_size on cuda, 0 on cpu; logical GPUs allowed)"
    )
    num_cpus_per_worker: float = _field(1.0, "deploy: CPUs a worker reserves")
    worker_restarts: int = _field(3, "deploy: how often a dead worker is restarted before it stays down")
    drain_timeout_s: float = _field(30.0, "how long a drained worker may take to finish its in-flight requests")
    warm_pool: int = _field(0, "deploy: drained workers kept parked (model loaded, device given back) for a start "
                               "in seconds (tandem serve and tandem deploy; on Ray a parked worker keeps its GPU "
                               "reservation; 0: drained workers exit)")
    placement_timeout_s: float = _field(60.0, "deploy: how long to wait for the cluster to place a service")
    ray_address: str = _field("", "deploy: Ray cluster address (empty: start a local Ray head)")
    worker_env: tuple[str, ...] = _field((), "deploy: KEY=VALUE environment of every service (NCCL_*, UCX_*, NIXL_*)")
    # -- planner (tandem planner; tandem serve runs one unless --no-planner) --
    planner_mode: str = _field("load", "planner: load (step-time regressions), throughput (forecast + profile) or both")
    planner_profile: str = _field("", "planner: profile for the throughput mode (planner/profiles name or .json path)")
    gpu_budget: int = _field(0, "planner: most workers both tiers hold together (0: the workers started)")
    min_prefill: int = _field(1, "planner: fewest prefill workers (disaggregated mode)")
    min_decode: int = _field(1, "planner: fewest decode workers")
    adjustment_interval_s: float = _field(10.0, "planner: seconds between decisions")
    planner_window_s: float = _field(
        0.0, "planner: arrivals counted over this window (0: three intervals); no arrival in it is zero traffic")
    planner_fast_interval_s: float = _field(
        5.0, "planner: a fast check between decisions, this often: starts only, for a tier whose workers "
             "show an SLO breach coming (0: none; used only when shorter than adjustment_interval_s)")
    planner_startup_s: float = _field(
        0.0, "planner: a new worker's start-up, s: the throughput mode sizes for the load this plus one interval "
             "ahead (0: the next interval)")
    planner_wake_s: float = _field(
        0.0, "planner: a parked worker's start, s (warm_pool): while one is parked the forecast looks this plus "
             "one interval ahead, if nearer (0: as planner_startup_s says)")
    spill_only_to_idle_decode: bool = _field(
        True, "router, disaggregated: with every prefill worker's queue full (8 x max_num_batched_tokens prompt "
        "tokens), spill a prompt onto a decode worker (prefill it there) only where no request is decoding or it "
        "computes at most max_local_prefill_tokens of it, else queue it on the prefill tier, unless that is over 4 "
        "times as far behind (then onto any): a long prefill in a decode worker's steps stalls its running answers "
        "past itl_slo_ms (router/policy.py spill_plan); --no-spill-only-to-idle-decode: onto any, as before")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            coerced = _coerce(f.name, _HINTS[f.name], value, "value")
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
        object.__setattr__(self, "log_level", self.log_level.upper())
        self._validate()

    @property
    def gpus_per_worker(self) -> float:
        """GPUs one worker reserves: as configured, else its tensor-parallel size on cuda, 0 on cpu."""
        if self.num_gpus_per_worker >= 0:
            return self.num_gpus_per_worker
        return float(self.tensor_parallel_size) if self.device.startswith("cuda") else 0.0

    @property
    def worker_env_vars(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.worker_env)

    @property
    def embedded_etcd(self) -> bool:
        """True when no etcd endpoints are configured: `tandem serve` starts its own."""
        return not self.etcd_endpoints

    def _fail(self, name: str, why: str) -> typing.NoReturn:
        raise ConfigError(f"{name}={getattr(self, name)!r}: {why}")

    def _validate(self) -> None:
        fail = self._fail
        try:
            check_name("namespace", self.namespace)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for endpoint in self.etcd_endpoints:
            try:
                split_endpoint(endpoint)
            except ValueError as exc:
                fail("etcd_endpoints", str(exc))
        self._validate_etcd_access()
        if not 2 <= self.lease_ttl_s <= 3600:
            fail("lease_ttl_s", "must be between 2 (etcd's minimum) and 3600 seconds")
        if not 0 < self.metrics_interval_s <= 60:
            fail("metrics_interval_s", "must be in (0, 60] seconds")
        if not self.host:
            fail("host", "must not be empty")
        ports = {"port": self.port, "grpc_port": self.grpc_port, "metrics_port": self.metrics_port}
        for name, port in ports.items():
            if not 0 <= port <= 65535:
                fail(name, "must be in 0..65535")
        taken = [p for p in ports.values() if p]
        if len(taken) != len(set(taken)):
            fail("port", f"port, grpc_port and metrics_port must differ: {ports}")
        if self.log_level not in _LOG_LEVELS:
            fail("log_level", f"must be one of {', '.join(_LOG_LEVELS)}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            fail("dtype", "must be bfloat16, float16 or float32")
        if self.threads < 0:
            fail("threads", "must be >= 0")
        if self.prefill_threads < 0:
            fail("prefill_threads", "must be >= 0")
        if self.idle_prefill_threads < 0:
            fail("idle_prefill_threads", "must be >= 0")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            fail("block_size", "must be a positive power of two")
        if self.kv_cache_gib < 0:
            fail("kv_cache_gib", "must be >= 0 (0: sized from the device)")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            fail("max_num_seqs", "max_num_seqs and max_num_batched_tokens must be >= 1")
        self._validate_serving()

    def step_tokens(self, role: str) -> int:
        """The token budget of an engine step of a worker of ``role`` (``prefill``: its own)."""
        if role != "prefill":
            return self.max_num_batched_tokens
        if self.prefill_max_num_batched_tokens:
            return self.prefill_max_num_batched_tokens
        if self.device == "cpu" and self.engine == "torch":  # a sim engine stands for its profile's device
            return min(CPU_PREFILL_STEP_TOKENS, self.max_num_batched_tokens)
        return self.max_num_batched_tokens

    def suffix_prefill_remote(self) -> bool:
        """Whether the router sends a suffix its decode worker would compute beside decodes to a prefill
        worker that gets to it as soon (``suffix_prefill``; auto: the CPU torch engine)."""
        if self.suffix_prefill != "auto":
            return self.suffix_prefill == "on"
        return self.device == "cpu" and self.engine == "torch"

    def _validate_serving(self) -> None:
        """The KV transfer, router and deployment settings."""
        fail = self._fail
        if self.transport not in ("auto", "nixl", "cuda_ipc", "nccl", "tcp", "loopback"):
            fail("transport", "must be auto, nixl, cuda_ipc, nccl, tcp or loopback")
        if self.kv_transfer_mode not in ("auto", "push", "pull"):
            fail("kv_transfer_mode", "must be auto, push or pull")
        if self.prefill_kv_cache_gib < 0:
            fail("prefill_kv_cache_gib", "must be >= 0")
        if self.host_kv_cache_gib < 0:
            fail("host_kv_cache_gib", "must be >= 0 (0: no host tier)")
        if self.prefill_max_num_batched_tokens < 0:
            fail("prefill_max_num_batched_tokens", "must be >= 0 (0: the device's default)")
        if self.batch_invariant and self.dtype == "float32":
            fail("batch_invariant", "is for 16-bit models (bfloat16 tested): float32 is not batch-invariant "
                 "in the mode")
        if not 0 <= self.gpu_memory_fraction <= 1:
            fail("gpu_memory_fraction", "must be in [0, 1]")
        if self.kv_lease_s <= 0 or self.kv_pull_timeout_s <= 0:
            fail("kv_lease_s", "kv_lease_s and kv_pull_timeout_s must be positive")
        if self.mode not in ("disaggregated", "aggregated"):
            fail("mode", "must be disaggregated or aggregated")
        if self.max_local_prefill_tokens < 0:
            fail("max_local_prefill_tokens", "must be >= 0")
        self._validate_security()
        if self.max_body_bytes < 1024:
            fail("max_body_bytes", "must be at least 1024")
        if self.http_read_timeout_s <= 0:
            fail("http_read_timeout_s", "must be positive")
        if self.engine not in ("torch", "sim"):
            fail("engine", "must be torch or sim")
        if self.async_scheduling not in ("auto", "on", "off"):
            fail("async_scheduling", "must be auto, on or off")
        if self.async_scheduling == "on" and self.engine == "sim":
            fail("async_scheduling", "needs the torch engine (the sim samples on the host)")
        if self.suffix_prefill not in ("auto", "on", "off"):
            fail("suffix_prefill", "must be auto, on or off")
        if self.first_token_hold not in ("auto", "on", "off"):
            fail("first_token_hold", "must be auto, on or off")
        if self.routing_policy not in ("kv", "round_robin", "random", "least_loaded"):
            fail("routing_policy", "must be kv, round_robin, random or least_loaded")
        if self.kv_index_ttl_s <= 0:
            fail("kv_index_ttl_s", "must be positive")
        if self.ttft_slo_ms <= 0 or self.itl_slo_ms <= 0:
            fail("ttft_slo_ms", "ttft_slo_ms and itl_slo_ms must be positive")
        if self.router_temperature < 0 or self.prefill_load_scale < 0:
            fail("router_temperature", "router_temperature and prefill_load_scale must be >= 0")
        if self.num_routers < 1 or self.num_decode < 1 or self.num_prefill < 0:
            fail("num_decode", "need at least one router and one decode worker, and no negative prefill count")
        if self.tensor_parallel_size < 1:
            fail("tensor_parallel_size", "must be >= 1")
        if self.num_cpus_per_worker < 0 or self.num_gpus_per_worker < -1:
            fail("num_gpus_per_worker", "num_gpus_per_worker (-1: auto) and num_cpus_per_worker must be >= 0")
        if self.worker_restarts < 0:
            fail("worker_restarts", "must be >= 0")
        if self.warm_pool < 0:
            fail("warm_pool", "must be >= 0")
        if self.drain_timeout_s < 0 or self.placement_timeout_s <= 0:
            fail("drain_timeout_s", "drain_timeout_s must be >= 0 and placement_timeout_s positive")
        if self.planner_mode not in ("load", "throughput", "both"):
            fail("planner_mode", "must be load, throughput or both")
        if self.ttft_slo_ms <= 0 or self.itl_slo_ms <= 0 or self.adjustment_interval_s <= 0:
            fail("ttft_slo_ms", "ttft_slo_ms, itl_slo_ms and adjustment_interval_s must be positive")
        if min(self.planner_fast_interval_s, self.planner_startup_s, self.planner_wake_s) < 0:
            fail("planner_fast_interval_s", "planner_fast_interval_s, planner_startup_s and planner_wake_s must be "
                                            ">= 0")
        if self.gpu_budget < 0 or self.min_prefill < 0 or self.min_decode < 1 or self.planner_window_s < 0:
            fail("gpu_budget", "gpu_budget, min_prefill and planner_window_s must be >= 0, min_decode >= 1")
        for item in self.worker_env:
            if "=" not in item or not item.split("=", 1)[0]:
                fail("worker_env", f"{item!r} is not KEY=VALUE")


    def _validate_etcd_access(self) -> None:
        """The etcd client's TLS and user (and, with an embedded etcd, how it serves)."""
        fail = self._fail
        has_password = self.etcd_password is not None or self.etcd_password_file is not None
        if self.etcd_password is not None and self.etcd_password_file is not None:
            fail("etcd_password_file", "give etcd_password (TANDEM_ETCD_PASSWORD) or etcd_password_file, not both")
        if (self.etcd_user is None) == has_password:
            fail("etcd_user", "etcd_user and its password (TANDEM_ETCD_PASSWORD or etcd_password_file) go together")
        if (self.etcd_cert_file is None) != (self.etcd_key_file is None):
            fail("etcd_cert_file", "etcd_cert_file and etcd_key_file go together")
        for name in ("etcd_ca_file", "etcd_cert_file", "etcd_key_file", "etcd_password_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                fail(name, "no such file")
        if self.embedded_etcd and self.etcd_ca_file is not None and self.etcd_cert_file is None:
            fail("etcd_ca_file", "the embedded etcd (no etcd_endpoints) serves TLS with etcd_cert_file and "
                 "etcd_key_file: set them too")

    def _validate_security(self) -> None:
        """Admission, API keys, TLS and the hung-worker watchdog."""
        fail = self._fail
        if self.max_queued_requests < 0 or self.max_queued_tokens < 0:
            fail("max_queued_requests", "max_queued_requests and max_queued_tokens must be >= 0")
        if any(not key or any(c.isspace() for c in key) for key in self.api_keys):
            fail("api_keys", "keys must be non-empty and have no whitespace")
        if any(not path.startswith("/") for path in self.public_paths):
            fail("public_paths", "paths start with /")
        if self.rate_limit_rpm < 0 or self.rate_limit_tpm < 0:
            fail("rate_limit_rpm", "rate_limit_rpm and rate_limit_tpm must be >= 0")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            fail("tls_cert_file", "tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            fail("tls_client_ca_file", "client certificates need the router to serve TLS (tls_cert_file)")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                fail(name, "no such file")
        internal = ("internal_tls_ca_file", "internal_tls_cert_file", "internal_tls_key_file")
        if len({getattr(self, name) is None for name in internal}) > 1:
            fail("internal_tls_ca_file", "internal_tls_ca_file, internal_tls_cert_file and internal_tls_key_file "
                 "go together")
        for name in internal:
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                fail(name, "no such file")
        if self.worker_silence_s <= 0 or self.worker_probe_timeout_s <= 0:
            fail("worker_silence_s", "worker_silence_s and worker_probe_timeout_s must be positive")


_HINTS: dict[str, Any] = typing.get_type_hints(ClusterConfig)
_FIELDS = {f.name: f for f in dataclasses.fields(ClusterConfig)}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _coerce(name: str, hint: Any, raw: Any, source: str) -> Any:
    """Convert `raw` (a string from env/CLI, or a YAML/JSON value) to the field's type."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType):  # `X | None`
        if raw is None or raw == "":
            return None
        (hint,) = [a for a in args if a is not type(None)]
        args = typing.get_args(hint)

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{name}: expected {expected}, got {raw!r} (from {source})")

    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise bad("a boolean")
    if hint is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and re.fullmatch(r"\s*[+-]?\d+\s*", raw):
            return int(raw)
        raise bad("an integer")
    if hint is float:
        if isinstance(raw, float):
            return raw
        if isinstance(raw, int) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(raw, str):
            try:
                return float(raw)
            except ValueError:
                pass
        raise bad("a number")
    if hint is str:
        if isinstance(raw, str):
            return raw
        raise bad("a string")
    if typing.get_origin(hint) is tuple and args[1:] == (Ellipsis,):
        if isinstance(raw, str):
            raw_items: list[Any] = [s.strip() for s in raw.split(",") if s.strip()]
        elif isinstance(raw, list | tuple):
            raw_items = list(raw)
        else:
            raise bad("a list or a comma-separated string")
        items = tuple(_coerce(name, args[0], item, source) for item in raw_items)
        return raw if isinstance(raw, tuple) and items == raw else items
    raise TypeError(f"ClusterConfig.{name}: unsupported field type {hint!r}")


def _env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The flat mapping in a .yaml/.yml/.json file, field names checked and values typed."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path} does not parse: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at top level")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in _FIELDS:
            raise ConfigError(f"config file {path}: unknown setting {key!r} (known: {', '.join(_FIELDS)})")
        out[name] = _coerce(name, _HINTS[name], value, str(path))
    return out


def read_env(env: Mapping[str, str]) -> dict[str, Any]:
    """Settings from `TANDEM_<FIELD>` variables (other TANDEM_ variables are ignored)."""
    out = {}
    for name in _FIELDS:
        env_name = _env_name(name)
        if env_name in env:
            out[name] = _coerce(name, _HINTS[name], env[env_name], env_name)
    return out


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ClusterConfig:
    """Defaults < file (`path`, else `$TANDEM_CONFIG`) < env < `overrides` (raw values allowed)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = path or env.get(CONFIG_ENV) or None
    if path:
        values.update(read_config_file(path))
    values.update(read_env(env))
    for name, raw in (overrides or {}).items():
        if name not in _FIELDS:
            raise ConfigError(f"unknown setting {name!r}")
        values[name] = _coerce(name, _HINTS[name], raw, "override")
    return ClusterConfig(**values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--config` and one flag per `ClusterConfig` field (defaults stay in the dataclass)."""
    group = parser.add_argument_group("cluster config (flags > TANDEM_* env > --config file)")
    group.add_argument("--config", metavar="PATH", default=None, help=f"YAML or JSON file (or ${CONFIG_ENV})")
    for name, f in _FIELDS.items():
        flag = "--" + name.replace("_", "-")
        default = f.default
        help_text = f"{f.metadata['help']} [env {_env_name(name)}; default {default!r}]"
        if f.metadata.get("secret"):
            group.add_argument(flag, dest=name, nargs="?", action=_RefuseSecret, default=None,
                               help=f"not a flag: {_env_name(name)} or the config file (ps shows flags)")
        elif _HINTS[name] is bool:
            group.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            group.add_argument(
                flag, dest=name, default=None, metavar=name.split("_")[-1].upper(), help=help_text
            )


class _RefuseSecret(argparse.Action):
    """A secret on the command line is visible to every user of the machine (ps): refused."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        env = _env_name(self.dest)
        parser.error(f"{option_string} is not taken on the command line (ps would show it to every user): "
                     f"set {env}, or {self.dest}_file where there is one, or put it in the --config file")


def from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ClusterConfig:
    """Build the config from parsed `add_arguments` flags on top of env and the config file."""
    overrides = {name: getattr(args, name) for name in _FIELDS if getattr(args, name, None) is not None}
    return load_config(getattr(args, "config", None), env=env, overrides=overrides)
