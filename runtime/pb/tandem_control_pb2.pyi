from runtime.pb import tandem_worker_pb2 as _tandem_worker_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TokenizerSource(_message.Message):
    __slots__ = ("gguf_file", "hf_dir", "synthetic_vocab_size")
    GGUF_FILE_FIELD_NUMBER: _ClassVar[int]
    HF_DIR_FIELD_NUMBER: _ClassVar[int]
    SYNTHETIC_VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    gguf_file: str
    hf_dir: str
    synthetic_vocab_size: int
    def __init__(self, gguf_file: _Optional[str] = ..., hf_dir: _Optional[str] = ..., synthetic_vocab_size: _Optional[int] = ...) -> None: ...

class ModelCard(_message.Message):
    __slots__ = ("name", "max_model_len", "tokenizer")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    name: str
    max_model_len: int
    tokenizer: TokenizerSource
    def __init__(self, name: _Optional[str] = ..., max_model_len: _Optional[int] = ..., tokenizer: _Optional[_Union[TokenizerSource, _Mapping]] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "role", "endpoint", "model", "block_size", "transport_metadata", "metrics_url", "pid", "started_at_unix_ms", "num_gpus")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_METADATA_FIELD_NUMBER: _ClassVar[int]
    METRICS_URL_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    NUM_GPUS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: _tandem_worker_pb2.WorkerRole
    endpoint: str
    model: ModelCard
    block_size: int
    transport_metadata: bytes
    metrics_url: str
    pid: int
    started_at_unix_ms: int
    num_gpus: float
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[_tandem_worker_pb2.WorkerRole, str]] = ..., endpoint: _Optional[str] = ..., model: _Optional[_Union[ModelCard, _Mapping]] = ..., block_size: _Optional[int] = ..., transport_metadata: _Optional[bytes] = ..., metrics_url: _Optional[str] = ..., pid: _Optional[int] = ..., started_at_unix_ms: _Optional[int] = ..., num_gpus: _Optional[float] = ...) -> None: ...

class WorkerStepStats(_message.Message):
    __slots__ = ("worker_id", "role", "state", "window_s", "num_waiting", "num_running", "num_queued_prefill_tokens", "num_active_kv_tokens", "kv_usage", "num_steps", "step_s", "step_prefill_tokens", "step_decode_tokens", "step_kv_tokens", "tokens_per_s", "decode_tokens_per_s", "num_prompt_tokens", "num_cached_tokens", "pid", "published_at_unix_ms")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[WorkerStepStats.State]
        STATE_SERVING: _ClassVar[WorkerStepStats.State]
        STATE_DRAINING: _ClassVar[WorkerStepStats.State]
        STATE_SWITCHING: _ClassVar[WorkerStepStats.State]
    STATE_UNSPECIFIED: WorkerStepStats.State
    STATE_SERVING: WorkerStepStats.State
    STATE_DRAINING: WorkerStepStats.State
    STATE_SWITCHING: WorkerStepStats.State
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_QUEUED_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_ACTIVE_KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_USAGE_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_S_FIELD_NUMBER: _ClassVar[int]
    STEP_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEP_DECODE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEP_KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: _tandem_worker_pb2.WorkerRole
    state: WorkerStepStats.State
    window_s: float
    num_waiting: int
    num_running: int
    num_queued_prefill_tokens: int
    num_active_kv_tokens: int
    kv_usage: float
    num_steps: int
    step_s: float
    step_prefill_tokens: float
    step_decode_tokens: float
    step_kv_tokens: float
    tokens_per_s: float
    decode_tokens_per_s: float
    num_prompt_tokens: int
    num_cached_tokens: int
    pid: int
    published_at_unix_ms: int
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[_tandem_worker_pb2.WorkerRole, str]] = ..., state: _Optional[_Union[WorkerStepStats.State, str]] = ..., window_s: _Optional[float] = ..., num_waiting: _Optional[int] = ..., num_running: _Optional[int] = ..., num_queued_prefill_tokens: _Optional[int] = ..., num_active_kv_tokens: _Optional[int] = ..., kv_usage: _Optional[float] = ..., num_steps: _Optional[int] = ..., step_s: _Optional[float] = ..., step_prefill_tokens: _Optional[float] = ..., step_decode_tokens: _Optional[float] = ..., step_kv_tokens: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., decode_tokens_per_s: _Optional[float] = ..., num_prompt_tokens: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., pid: _Optional[int] = ..., published_at_unix_ms: _Optional[int] = ...) -> None: ...

class RouterWindowStats(_message.Message):
    __slots__ = ("router_id", "window_s", "num_arrivals", "num_finished", "num_inflight", "request_rate", "isl_mean", "isl_p50", "isl_p95", "osl_mean", "osl_p50", "osl_p95", "ttft_ms_p50", "ttft_ms_p90", "ttft_ms_p95", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p90", "itl_ms_p95", "itl_ms_p99", "e2e_ms_p50", "published_at_unix_ms", "num_arrivals_total", "num_finished_total", "num_prompt_tokens_total", "num_output_tokens_total", "num_requested_tokens_total", "num_finished_requested_tokens_total")
    ROUTER_ID_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    NUM_ARRIVALS_FIELD_NUMBER: _ClassVar[int]
    NUM_FINISHED_FIELD_NUMBER: _ClassVar[int]
    NUM_INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_RATE_FIELD_NUMBER: _ClassVar[int]
    ISL_MEAN_FIELD_NUMBER: _ClassVar[int]
    ISL_P50_FIELD_NUMBER: _ClassVar[int]
    ISL_P95_FIELD_NUMBER: _ClassVar[int]
    OSL_MEAN_FIELD_NUMBER: _ClassVar[int]
    OSL_P50_FIELD_NUMBER: _ClassVar[int]
    OSL_P95_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_P50_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_P90_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_P95_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_P99_FIELD_NUMBER: _ClassVar[int]
    ITL_MS_P50_FIELD_NUMBER: _ClassVar[int]
    ITL_MS_P90_FIELD_NUMBER: _ClassVar[int]
    ITL_MS_P95_FIELD_NUMBER: _ClassVar[int]
    ITL_MS_P99_FIELD_NUMBER: _ClassVar[int]
    E2E_MS_P50_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    NUM_ARRIVALS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_FINISHED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_OUTPUT_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTED_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_FINISHED_REQUESTED_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    router_id: str
    window_s: float
    num_arrivals: int
    num_finished: int
    num_inflight: int
    request_rate: float
    isl_mean: float
    isl_p50: float
    isl_p95: float
    osl_mean: float
    osl_p50: float
    osl_p95: float
    ttft_ms_p50: float
    ttft_ms_p90: float
    ttft_ms_p95: float
    ttft_ms_p99: float
    itl_ms_p50: float
    itl_ms_p90: float
    itl_ms_p95: float
    itl_ms_p99: float
    e2e_ms_p50: float
    published_at_unix_ms: int
    num_arrivals_total: int
    num_finished_total: int
    num_prompt_tokens_total: int
    num_output_tokens_total: int
    num_requested_tokens_total: int
    num_finished_requested_tokens_total: int
    def __init__(self, router_id: _Optional[str] = ..., window_s: _Optional[float] = ..., num_arrivals: _Optional[int] = ..., num_finished: _Optional[int] = ..., num_inflight: _Optional[int] = ..., request_rate: _Optional[float] = ..., isl_mean: _Optional[float] = ..., isl_p50: _Optional[float] = ..., isl_p95: _Optional[float] = ..., osl_mean: _Optional[float] = ..., osl_p50: _Optional[float] = ..., osl_p95: _Optional[float] = ..., ttft_ms_p50: _Optional[float] = ..., ttft_ms_p90: _Optional[float] = ..., ttft_ms_p95: _Optional[float] = ..., ttft_ms_p99: _Optional[float] = ..., itl_ms_p50: _Optional[float] = ..., itl_ms_p90: _Optional[float] = ..., itl_ms_p95: _Optional[float] = ..., itl_ms_p99: _Optional[float] = ..., e2e_ms_p50: _Optional[float] = ..., published_at_unix_ms: _Optional[int] = ..., num_arrivals_total: _Optional[int] = ..., num_finished_total: _Optional[int] = ..., num_prompt_tokens_total: _Optional[int] = ..., num_output_tokens_total: _Optional[int] = ..., num_requested_tokens_total: _Optional[int] = ..., num_finished_requested_tokens_total: _Optional[int] = ...) -> None: ...

class Inflight(_message.Message):
    __slots__ = ("num_requests", "num_prefill_tokens", "num_kv_tokens")
    NUM_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    num_requests: int
    num_prefill_tokens: int
    num_kv_tokens: int
    def __init__(self, num_requests: _Optional[int] = ..., num_prefill_tokens: _Optional[int] = ..., num_kv_tokens: _Optional[int] = ...) -> None: ...

class TierInflight(_message.Message):
    __slots__ = ("workers",)
    class WorkersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Inflight
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Inflight, _Mapping]] = ...) -> None: ...
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.MessageMap[str, Inflight]
    def __init__(self, workers: _Optional[_Mapping[str, Inflight]] = ...) -> None: ...

class RouterInflight(_message.Message):
    __slots__ = ("router_id", "tiers")
    class TiersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: TierInflight
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[TierInflight, _Mapping]] = ...) -> None: ...
    ROUTER_ID_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    router_id: str
    tiers: _containers.MessageMap[str, TierInflight]
    def __init__(self, router_id: _Optional[str] = ..., tiers: _Optional[_Mapping[str, TierInflight]] = ...) -> None: ...

class PlannerAction(_message.Message):
    __slots__ = ("kind", "role", "worker_id")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[PlannerAction.Kind]
        KIND_START: _ClassVar[PlannerAction.Kind]
        KIND_DRAIN: _ClassVar[PlannerAction.Kind]
        KIND_SWITCH: _ClassVar[PlannerAction.Kind]
        KIND_ABANDON: _ClassVar[PlannerAction.Kind]
    KIND_UNSPECIFIED: PlannerAction.Kind
    KIND_START: PlannerAction.Kind
    KIND_DRAIN: PlannerAction.Kind
    KIND_SWITCH: PlannerAction.Kind
    KIND_ABANDON: PlannerAction.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    kind: PlannerAction.Kind
    role: str
    worker_id: str
    def __init__(self, kind: _Optional[_Union[PlannerAction.Kind, str]] = ..., role: _Optional[str] = ..., worker_id: _Optional[str] = ...) -> None: ...

class PlannerReason(_message.Message):
    __slots__ = ("code", "role", "values")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CODE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    code: str
    role: str
    values: _containers.ScalarMap[str, float]
    def __init__(self, code: _Optional[str] = ..., role: _Optional[str] = ..., values: _Optional[_Mapping[str, float]] = ...) -> None: ...

class PlannerDecision(_message.Message):
    __slots__ = ("planner_id", "decided_at_unix_ms", "mode", "num_prefill", "num_decode", "actions", "reasons", "num_prefill_ready", "num_decode_ready", "request_rate", "dry_run", "seq")
    PLANNER_ID_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFILL_FIELD_NUMBER: _ClassVar[int]
    NUM_DECODE_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFILL_READY_FIELD_NUMBER: _ClassVar[int]
    NUM_DECODE_READY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_RATE_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    planner_id: str
    decided_at_unix_ms: int
    mode: str
    num_prefill: int
    num_decode: int
    actions: _containers.RepeatedCompositeFieldContainer[PlannerAction]
    reasons: _containers.RepeatedCompositeFieldContainer[PlannerReason]
    num_prefill_ready: int
    num_decode_ready: int
    request_rate: float
    dry_run: bool
    seq: int
    def __init__(self, planner_id: _Optional[str] = ..., decided_at_unix_ms: _Optional[int] = ..., mode: _Optional[str] = ..., num_prefill: _Optional[int] = ..., num_decode: _Optional[int] = ..., actions: _Optional[_Iterable[_Union[PlannerAction, _Mapping]]] = ..., reasons: _Optional[_Iterable[_Union[PlannerReason, _Mapping]]] = ..., num_prefill_ready: _Optional[int] = ..., num_decode_ready: _Optional[int] = ..., request_rate: _Optional[float] = ..., dry_run: bool = ..., seq: _Optional[int] = ...) -> None: ...

class PlannerInfo(_message.Message):
    __slots__ = ("planner_id", "metrics_url", "mode", "dry_run", "pid", "started_at_unix_ms")
    PLANNER_ID_FIELD_NUMBER: _ClassVar[int]
    METRICS_URL_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    planner_id: str
    metrics_url: str
    mode: str
    dry_run: bool
    pid: int
    started_at_unix_ms: int
    def __init__(self, planner_id: _Optional[str] = ..., metrics_url: _Optional[str] = ..., mode: _Optional[str] = ..., dry_run: bool = ..., pid: _Optional[int] = ..., started_at_unix_ms: _Optional[int] = ...) -> None: ...

class LauncherInfo(_message.Message):
    __slots__ = ("launcher_id", "endpoint", "mode", "pid", "started_at_unix_ms")
    LAUNCHER_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    launcher_id: str
    endpoint: str
    mode: str
    pid: int
    started_at_unix_ms: int
    def __init__(self, launcher_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., mode: _Optional[str] = ..., pid: _Optional[int] = ..., started_at_unix_ms: _Optional[int] = ...) -> None: ...

class ServiceStatus(_message.Message):
    __slots__ = ("name", "role", "state", "node", "pid", "endpoint", "worker_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    state: str
    node: str
    pid: int
    endpoint: str
    worker_id: str
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., state: _Optional[str] = ..., node: _Optional[str] = ..., pid: _Optional[int] = ..., endpoint: _Optional[str] = ..., worker_id: _Optional[str] = ...) -> None: ...

class StartServicesRequest(_message.Message):
    __slots__ = ("roles", "timeout_s")
    ROLES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    roles: _containers.RepeatedScalarFieldContainer[str]
    timeout_s: float
    def __init__(self, roles: _Optional[_Iterable[str]] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class StartServicesResponse(_message.Message):
    __slots__ = ("services",)
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    services: _containers.RepeatedCompositeFieldContainer[ServiceStatus]
    def __init__(self, services: _Optional[_Iterable[_Union[ServiceStatus, _Mapping]]] = ...) -> None: ...

class DrainServicesRequest(_message.Message):
    __slots__ = ("names", "timeout_s")
    NAMES_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    timeout_s: float
    def __init__(self, names: _Optional[_Iterable[str]] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class DrainOutcome(_message.Message):
    __slots__ = ("num_inflight", "drained")
    NUM_INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    num_inflight: int
    drained: bool
    def __init__(self, num_inflight: _Optional[int] = ..., drained: bool = ...) -> None: ...

class DrainServicesResponse(_message.Message):
    __slots__ = ("drained",)
    class DrainedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: DrainOutcome
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[DrainOutcome, _Mapping]] = ...) -> None: ...
    DRAINED_FIELD_NUMBER: _ClassVar[int]
    drained: _containers.MessageMap[str, DrainOutcome]
    def __init__(self, drained: _Optional[_Mapping[str, DrainOutcome]] = ...) -> None: ...

class SwitchWorkerRequest(_message.Message):
    __slots__ = ("name", "role", "timeout_s")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    name: str
    role: str
    timeout_s: float
    def __init__(self, name: _Optional[str] = ..., role: _Optional[str] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class SwitchWorkerResponse(_message.Message):
    __slots__ = ("previous_role", "role", "num_inflight", "switch_ms")
    PREVIOUS_ROLE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NUM_INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    SWITCH_MS_FIELD_NUMBER: _ClassVar[int]
    previous_role: str
    role: str
    num_inflight: int
    switch_ms: float
    def __init__(self, previous_role: _Optional[str] = ..., role: _Optional[str] = ..., num_inflight: _Optional[int] = ..., switch_ms: _Optional[float] = ...) -> None: ...

class ListServicesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListServicesResponse(_message.Message):
    __slots__ = ("services",)
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    services: _containers.RepeatedCompositeFieldContainer[ServiceStatus]
    def __init__(self, services: _Optional[_Iterable[_Union[ServiceStatus, _Mapping]]] = ...) -> None: ...
