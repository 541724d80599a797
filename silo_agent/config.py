"""The silo agent's TOML configuration, loaded once at start into frozen dataclasses.

Rule: every check happens here, before the agent dials, and every problem is reported as
`<file>: [table] key <problem>` (`ConfigError`, one line per problem). Unknown tables and keys are
refused with a "did you mean". Relative paths are resolved against the config file's folder. The
file's schema is the strict models below (silofed.config_schema); the rest of the agent sees only
the frozen dataclasses. The silo's identity is NOT configured: it is the URI SAN of its
certificate; `[silo] name`/`id` is only checked against it so a mix-up of files is caught at start.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Self
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from silo_agent.storage.silo_state import DEFAULT_REMEMBERED_MODELS
from silofed import config_schema as schema
from silofed.config_schema import Problem, StrictModel, TaskTable, TlsFiles, TlsPaths, load_model


class ConfigError(schema.ConfigError):
    """A silo configuration file is missing, unparsable, or has bad keys; str() holds one
    `<file>: [table] key <problem>` line per problem (a silofed.config_schema.ConfigError)."""


@dataclass(frozen=True, slots=True)
class SiloTls(TlsPaths):
    # "signed": adopt a newer roster the coordinator delivers when the pinned CA signed it;
    # "manual": never change the pinned roster (silo_agent.pki.roster_update).
    roster_updates: str = "signed"


@dataclass(frozen=True, slots=True)
class Reconnect:
    """Exponential backoff with full jitter between `initial_s` and `max_s`."""

    initial_s: float = 0.5
    max_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError("reconnect delays need 0 < initial_s <= max_s")


# `[tls] roster_updates`: adopt CA-signed rosters the coordinator delivers, or never.
ROSTER_UPDATE_MODES = ("signed", "manual")

# Where `[debug] pause_after_phase` may stop a silo (tests kill it there): after the offer
# arrived, after sending its key advertisement, its shares, its masked upload, its signature.
PAUSE_POINTS = ("offer", "advertise", "share_keys", "masked", "consistency")


# The most a coordinator may ask of local training unless [train_limits] says otherwise.
DEFAULT_TRAIN_LIMITS: Mapping[str, float] = {"epochs": 100}
MAX_ROUND_STEP = 10_000


@dataclass(frozen=True, slots=True)
class SecAggPolicy:
    """`[secagg]`: what this silo accepts from a coordinator it does not trust."""

    allow_plaintext_insecure: bool = False  # send the update IN THE CLEAR when asked to
    max_masked_inputs_per_model: int = 3  # same-model retries, each only with the same U3
    # Models whose records the state keeps; older ones are retired (no further masked input).
    remembered_models: int = DEFAULT_REMEMBERED_MODELS
    t_floor: int = 3
    n_colluders_max: int | None = None
    n_colluders_min: int | None = None  # None: ⌊(n−1)/3⌋ for n invited silos
    max_model_bytes: int | None = None  # None: 2 × this silo's own model + 1 MiB
    max_round_step: int = MAX_ROUND_STEP
    min_noise_multiplier: float = 0.0  # > 0: refuse rounds without DP noise of at least this z
    allow_sparse_graph: bool = False  # take part in Harary-graph rounds (opt-in)
    # Example-weighted rounds tell the coordinator this silo's quantised, capped example count
    # (its weight is decoded for the blame check); false refuses them (CONFIG_REJECTED).
    allow_example_weighting: bool = False
    train_limits: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_TRAIN_LIMITS))


@dataclass(frozen=True, slots=True)
class SiloPki:
    """`[pki]`: renewing this silo's certificate over its connection (silo_agent.pki.renewal).

    `renew_before_days`: ask for a renewal once the certificate expires within this many days;
    None: within the last third of its lifetime. `renew_check_s`: how often a connected silo
    looks again (and asks again while its request waits for the operator's approval)."""

    auto_renew: bool = True
    renew_before_days: float | None = None
    renew_check_s: float = 3600.0


@dataclass(frozen=True, slots=True)
class SiloTraining:
    """`[train]`: how this silo runs the task's training (what it trains with is the
    coordinator's [train] table). `workers` > 1: under torchrun, that many gloo workers on this
    machine, for a task declaring ``distributed = True`` (silo_agent.runtime.distributed);
    `timeout_s`: the longest such a training may run (a secure round's deadlines may cut it
    shorter)."""

    workers: int = 1
    timeout_s: float = 3600.0


@dataclass(frozen=True, slots=True)
class SiloConfig:
    source: Path
    name: str | None
    silo_id: str | None
    state_dir: Path
    address: str
    server_name: str | None
    tls: SiloTls
    task_spec: str
    task_options: Mapping[str, Any] = field(default_factory=dict)
    reconnect: Reconnect = field(default_factory=Reconnect)
    secagg: SecAggPolicy = field(default_factory=SecAggPolicy)
    pause_after_phase: str | None = None  # [debug]: for fault-injection tests only
    pause_in_round: int | None = None  # [debug]: only in this round (default: the first)
    keep_final_model: bool = False  # [silo]: write the federation's final model to state_dir
    proxy: str | None = None  # [coordinator]: the HTTP CONNECT proxy to dial through, if any
    pki: SiloPki = field(default_factory=SiloPki)  # [pki]: certificate renewal
    train: SiloTraining = field(default_factory=SiloTraining)  # [train]: local workers


# ---- the file's schema: one strict model per table --------------------------------------------


def _spiffe_id(value: str) -> str:
    if not value.startswith("spiffe://"):
        raise ValueError(f"must be a spiffe:// URI, got {value!r}")
    return value


def _real_port(value: str) -> str:
    if value.endswith(":0"):
        raise ValueError("needs the coordinator's real port, not 0")
    return value


def _proxy_url(value: str) -> str:
    """`http://host:port` of an HTTP CONNECT proxy, as gRPC's `grpc.http_proxy` takes it."""
    shape = f"must be http://host:port (an HTTP CONNECT proxy), got {value!r}"
    try:
        url = urlsplit(value)
        port = url.port
    except ValueError:  # a port that is no number, or above 65535
        raise ValueError(shape) from None
    if url.scheme == "https":
        raise ValueError(f"{shape}: gRPC speaks plain HTTP to the proxy (TLS runs inside)")
    if url.scheme != "http" or not url.hostname or port is None or port == 0:
        raise ValueError(shape)
    if url.username is not None or url.password is not None:
        raise ValueError(
            f"{shape}: credentials in the URL are not supported; have the proxy admit the "
            "silo's address instead"
        )
    if url.path not in ("", "/") or url.query or url.fragment:
        raise ValueError(f"{shape}: nothing may follow the port")
    return f"http://{url.netloc}"


def no_proxy_bypass(address: str, environ: Mapping[str, str]) -> str | None:
    """Which `no_grpc_proxy`/`no_proxy` entry of `environ` makes gRPC dial `address` (host:port)
    directly although a proxy is configured, as gRPC reads them: no_grpc_proxy when set, else
    no_proxy; an entry matches a host that ends with it, or an address inside it (a CIDR range).
    None when none does."""
    name = "no_grpc_proxy" if "no_grpc_proxy" in environ else "no_proxy"
    listed = environ.get(name, "")
    host = address.rpartition(":")[0].strip("[]")
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for entry in (e.strip() for e in listed.split(",")):
        if not entry:
            continue
        within = False
        if ip is not None and "/" in entry:
            try:
                within = ip in ipaddress.ip_network(entry, strict=False)
            except ValueError:
                within = False
        if within or host.lower().endswith(entry.lower()):
            return f"{name}={listed!r} lists {entry!r}"
    return None


def _train_limit(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"must be a number > 0, got {value!r}")
    return float(value)


class _Silo(StrictModel):
    name: str | None = None
    id: Annotated[str, AfterValidator(_spiffe_id)] | None = None
    state_dir: schema.ConfigPath
    keep_final_model: bool = False

    @model_validator(mode="after")
    def _named(self) -> Self:
        if self.name is None and self.id is None:
            raise Problem("name", "is missing (give `name` or `id`)")
        return self


class _Coordinator(StrictModel):
    address: Annotated[schema.HostPort, AfterValidator(_real_port)]
    server_name: str | None = None
    proxy: Annotated[str, AfterValidator(_proxy_url)] | None = None

    @model_validator(mode="after")
    def _proxy_applies(self) -> Self:
        # gRPC honours no_proxy even for a proxy set on the channel: the configured proxy
        # would be skipped without a word, so say so now.
        if self.proxy is not None and (why := no_proxy_bypass(self.address, os.environ)):
            raise Problem(
                "proxy",
                f"would be bypassed: the agent's environment {why}, which matches "
                f"{self.address}; remove that entry, or set no_grpc_proxy (gRPC reads it "
                "before no_proxy) without it",
            )
        return self


class _Tls(TlsFiles):
    roster_updates: Annotated[str, schema.one_of(ROSTER_UPDATE_MODES)] = "signed"


class _Task(TaskTable):
    options: dict[str, Any] = Field(default_factory=dict)  # [task.options]: the task's own


class _Reconnect(StrictModel):
    initial_s: schema.PositiveFloat = 0.5
    max_s: schema.PositiveFloat = 30.0

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.initial_s > self.max_s:
            raise Problem("initial_s", f"must be <= max_s ({self.max_s})")
        return self


class _SecAgg(StrictModel):
    allow_plaintext_insecure: bool = False
    max_masked_inputs_per_model: schema.PositiveInt = 3
    remembered_models: schema.PositiveInt = DEFAULT_REMEMBERED_MODELS
    t_floor: Annotated[int, schema.at_least(3, "the protocol's floor")] = 3
    n_colluders_max: schema.NonNegativeInt | None = None
    n_colluders_min: schema.NonNegativeInt | None = None
    max_model_bytes: schema.PositiveInt | None = None
    max_round_step: schema.PositiveInt = MAX_ROUND_STEP
    min_noise_multiplier: schema.NonNegativeFloat = 0.0
    allow_sparse_graph: bool = False
    allow_example_weighting: bool = False

    @model_validator(mode="after")
    def _colluder_bounds(self) -> Self:
        low, high = self.n_colluders_min, self.n_colluders_max
        if low is not None and high is not None and low > high:
            raise Problem("n_colluders_min", f"must be <= n_colluders_max ({high})")
        return self


class _Debug(StrictModel):
    pause_after_phase: Annotated[str, schema.one_of(PAUSE_POINTS)] | None = None
    pause_in_round: schema.PositiveInt | None = None


class _Pki(StrictModel):
    auto_renew: bool = True
    renew_before_days: schema.PositiveFloat | None = None
    renew_check_s: schema.PositiveFloat = 3600.0


class _Train(StrictModel):
    workers: schema.PositiveInt = 1
    timeout_s: schema.PositiveFloat = 3600.0


class _SiloFile(StrictModel):
    silo: _Silo
    coordinator: _Coordinator
    tls: _Tls
    task: _Task
    reconnect: _Reconnect = Field(default_factory=_Reconnect)
    secagg: _SecAgg = Field(default_factory=_SecAgg)
    debug: _Debug = Field(default_factory=_Debug)
    pki: _Pki = Field(default_factory=_Pki)
    train: _Train = Field(default_factory=_Train)
    # [train_limits]: parameter name -> the largest value this silo trains with (numbers > 0);
    # the defaults (epochs = 100) apply unless the table names the key.
    train_limits: dict[str, Annotated[float, BeforeValidator(_train_limit)]] = Field(
        default_factory=dict
    )


def load_silo_config(path: Path) -> SiloConfig:
    """Load and validate a silo config. Raises ConfigError naming the file, table and key of
    every problem found (one line each)."""
    path = Path(path).resolve()
    f = load_model(_SiloFile, path, error=ConfigError)
    # Where a table's keys are its dataclass's fields, the table is passed whole.
    policy = SecAggPolicy(
        **f.secagg.model_dump(), train_limits={**DEFAULT_TRAIN_LIMITS, **f.train_limits}
    )
    return SiloConfig(
        source=path,
        name=f.silo.name,
        silo_id=f.silo.id,
        state_dir=f.silo.state_dir,
        address=f.coordinator.address,
        server_name=f.coordinator.server_name,
        proxy=f.coordinator.proxy,
        tls=SiloTls(**f.tls.model_dump()),
        task_spec=f.task.spec,
        task_options=dict(f.task.options),
        reconnect=Reconnect(**f.reconnect.model_dump()),
        secagg=policy,
        pause_after_phase=f.debug.pause_after_phase,
        pause_in_round=f.debug.pause_in_round,
        keep_final_model=f.silo.keep_final_model,
        pki=SiloPki(**f.pki.model_dump()),
        train=SiloTraining(**f.train.model_dump()),
    )
