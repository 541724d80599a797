"""The coordinator's TOML configuration, loaded once at start into frozen dataclasses.

Rule: every check happens here, before anything listens or trains, and every problem is reported
as `<file>: [table] key <problem>` (`ConfigError`, one line per problem). Unknown tables and keys
are refused with a "did you mean". Relative paths are resolved against the config file's folder.
The file's schema is the strict models below (silofed.config_schema); the rest of the
coordinator sees only the frozen dataclasses. Nothing else in the coordinator reads TOML or
environment variables.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Self

from pydantic import AfterValidator, Field, model_validator

from coordinator.pki.certificates import SILO_VALID_DAYS
from protos.names import PLAINTEXT_INSECURE, SECAGG
from secagg.graph_params import DEFAULT_DROPOUT_RATE, least_degree
from secagg.train_params import TrainParamsError, canonical_train_params, parse_train_params
from silofed import config_schema as schema
from silofed.config_schema import Problem, StrictModel, TaskTable, TlsFiles, TlsPaths, load_model


class ConfigError(schema.ConfigError):
    """A coordinator configuration file is missing, unparsable, or has bad keys; str() holds one
    `<file>: [table] key <problem>` line per problem (a silofed.config_schema.ConfigError)."""


class WeightingMode(enum.Enum):
    EXAMPLES = "examples"
    UNIFORM = "uniform"


class GraphMode(enum.Enum):
    """`[secagg] graph`: whom each silo masks with and shares its secrets among
    (docs/secagg-protocol.md §4.6)."""

    COMPLETE = "complete"  # every other silo of the round
    HARARY = "harary"  # its ring neighbours only (secagg.graph_params picks the degree)


@dataclass(frozen=True, slots=True)
class SecAggSettings:
    """Coordinator `[secagg]` settings (validated by the config loader)."""

    clip_l2: float
    threshold: int | None = None
    n_colluders: int | None = None
    ring_bits: int = 32
    weighting: WeightingMode = WeightingMode.UNIFORM
    weight_max: int = 100_000
    dp_noise_multiplier: float | None = None  # None: DP off
    dp_noise_divisor: int = 1
    graph: GraphMode = GraphMode.COMPLETE
    graph_degree: int | None = None  # None: secagg.graph_params.choose_sparse_graph's rule
    dropout_rate: float = DEFAULT_DROPOUT_RATE  # δ of that rule


@dataclass(frozen=True, slots=True)
class PlaintextLimits:
    """What one silo's plaintext update may be: `[plaintext]` (validated by the config loader).

    `clip_l2`: the largest L2 norm of an update (all its tensors, in float64); None sets no norm
    bound (values must still be finite). `weight_max`: the largest example count a silo may
    report; a larger one is refused, not capped."""

    clip_l2: float | None = None
    weight_max: int = 100_000


# Secure aggregation (the default) is driven by coordinator.rounds.secure; the plaintext baseline
# by coordinator.rounds.fedavg.
KNOWN_AGGREGATIONS = (SECAGG, PLAINTEXT_INSECURE)
# Names refused with an explanation rather than "unknown": they used to select (or look like
# they select) the in-the-clear baseline, which must now be named as insecure.
_RENAMED = {
    "plaintext": (
        "the plaintext baseline sends every silo's update IN THE CLEAR to the coordinator "
        f"(it is insecure); to select it anyway, name it {PLAINTEXT_INSECURE!r}"
    ),
}


def check_aggregation_name(name: str) -> str:
    """`name` if it names a known aggregation; else ValueError saying what to write."""
    if name in _RENAMED:
        raise ValueError(f"{name!r} is refused: {_RENAMED[name]}")
    if name not in KNOWN_AGGREGATIONS:
        raise ValueError(f"must be one of {list(KNOWN_AGGREGATIONS)}, got {name!r}")
    return name


# Where `[debug] pause_after_phase` may freeze the coordinator, in round order (what each point
# is: coordinator.runtime.debug_pause).
PAUSE_POINTS = (
    "offer",
    "advertise",
    "share_keys",
    "masked",
    "consistency",
    "unmask",
    "checkpoint",
    "roundlog",
)


# [server_optimizer]: how the next global model is made from a round's FedAvg result, which
# secure aggregation produces without any silo's own update (coordinator.rounds.server_optimizer;
# Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2). Each method -> the keys it
# uses, with their defaults; any other key is refused for that method. fedavg (the default) takes
# the FedAvg result as it is.
SERVER_OPTIMIZERS: dict[str, dict[str, float]] = {
    "fedavg": {},
    "fedavgm": {"lr": 1.0, "momentum": 0.9},
    "fedadam": {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedyogi": {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedadagrad": {"lr": 0.1, "beta1": 0.9, "tau": 1e-3},
}
_SERVER_OPTIMIZER_KEYS = ("lr", "momentum", "beta1", "beta2", "tau")


def server_optimizer_problem(key: str, value: float) -> str | None:
    """What is wrong with `value` for the server optimizer's `key`, or None: `lr` and `tau` are
    finite and > 0; `momentum`, `beta1` and `beta2` are decay rates in [0, 1)."""
    if not math.isfinite(value):
        return f"must be a finite number, got {value}"
    if key in ("lr", "tau"):
        return None if value > 0 else f"must be > 0, got {value:g}"
    return None if 0 <= value < 1 else f"must be in [0, 1), got {value:g}"


@dataclass(frozen=True, slots=True)
class ServerOptimizerSettings:
    """`[server_optimizer]`: the method and exactly the hyperparameters it uses (sorted, every
    default filled in). Build it with `of`; an unknown method, a missing or foreign key or a value
    out of range is a ValueError saying which."""

    method: str = "fedavg"
    params: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if self.method not in SERVER_OPTIMIZERS:
            raise ValueError(
                f"server optimizer method must be one of {list(SERVER_OPTIMIZERS)}, "
                f"got {self.method!r}"
            )
        wanted = sorted(SERVER_OPTIMIZERS[self.method])
        if [key for key, _ in self.params] != wanted:
            raise ValueError(
                f"server optimizer {self.method!r} takes exactly {wanted} (sorted), got "
                f"{[key for key, _ in self.params]}"
            )
        for key, value in self.params:
            problem = server_optimizer_problem(key, value)
            if problem is not None:
                raise ValueError(f"server optimizer {self.method!r}: {key} {problem}")

    @classmethod
    def of(cls, method: str, **given: float) -> ServerOptimizerSettings:
        """`method` with the hyperparameters `given`, the others at their defaults."""
        defaults = SERVER_OPTIMIZERS.get(method)
        if defaults is None:
            return cls(method)  # refused by __post_init__, naming the methods
        foreign = sorted(set(given) - set(defaults))
        if foreign:
            raise ValueError(
                f"server optimizer {method!r} does not use {foreign}; it uses {sorted(defaults)}"
            )
        values = {**defaults, **given}
        return cls(method, tuple((key, float(values[key])) for key in sorted(values)))

    def param(self, key: str) -> float:
        """The value of hyperparameter `key`; KeyError if this method does not use it."""
        for name, value in self.params:
            if name == key:
                return value
        raise KeyError(f"server optimizer {self.method!r} has no hyperparameter {key!r}")


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """`[metrics]`: the Prometheus endpoint (coordinator.observability.metrics); off when absent."""

    listen: str  # host:port; port 0 picks a free one, written to <state_dir>/metrics.port


@dataclass(frozen=True, slots=True)
class DebugConfig:
    """`[debug]`: fault injection for tests (coordinator.runtime.debug_pause); never in production
    configurations."""

    pause_after_phase: str | None = None  # one of PAUSE_POINTS


@dataclass(frozen=True, slots=True)
class TlsConfig(TlsPaths):
    revoked: Path  # the serials this coordinator refuses (the file may not exist yet)


@dataclass(frozen=True, slots=True)
class PkiConfig:
    """`[pki]`: certificate renewal over the silos' connections and expiry warnings
    (coordinator.pki.renewal; docs/pki.md).

    `auto_renew`: sign a silo's same-key renewal at once with `issuing_cert`/`issuing_key`;
    false (the default) queues it in `renewals_dir` for `silofed-coordinator pki approve`, run
    wherever the CA key is kept."""

    auto_renew: bool = False
    # The CA certificate that signs renewals: the root, or (docs/pki.md) the online intermediate,
    # whose file then carries the intermediate only (silos receive leaf + intermediate).
    issuing_cert: Path | None = None
    issuing_key: Path | None = None  # its key (needed on this host only with auto_renew)
    renew_valid_days: int = SILO_VALID_DAYS  # lifetime of a renewed silo certificate
    renewals_dir: Path | None = None  # None: <state_dir>/renewals
    expiry_warning_days: float = 30.0  # log, status and metrics warn this long before expiry


@dataclass(frozen=True, slots=True)
class RoundsConfig:
    count: int
    min_silos: int
    aggregation: str
    silos_per_round: int | None = None
    start_timeout_s: float = 120.0
    start_silos: int | None = None  # silos to wait for before the first round (default min_silos)
    # Never spin: after an aborted round wait initial_s, doubling up to max_s; the same cause
    # this many rounds in a row stops the federation with a diagnosis (exit code 4).
    max_consecutive_aborts: int = 3
    abort_backoff_initial_s: float = 1.0
    abort_backoff_max_s: float = 60.0


@dataclass(frozen=True, slots=True)
class Deadlines:
    """Per-phase deadlines in seconds; a silo that misses one drops out of that round."""

    offer_s: float = 60.0  # model download (+ the key advertisement under secagg)
    train_s: float = 300.0  # local training + upload (the masked phase under secagg)
    share_keys_s: float = 60.0  # secagg phases that need no training:
    consistency_s: float = 60.0
    unmask_s: float = 60.0
    # An upload (an update, or a masked vector holding one of the buffered-upload slots) that
    # receives no chunk for this long is dropped and its slot freed: a stalled silo cannot hold
    # a slot until the phase deadline.
    upload_progress_s: float = 30.0


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What a peer may hold of the server before it is a member with a live stream ([server])."""

    hello_timeout_s: float = 10.0  # a stream that has not said hello by then is closed
    handshake_timeout_s: float = 10.0  # TCP + TLS + HTTP/2 setup; a slower connection is closed
    idle_connection_s: float = 60.0  # a connection with no open stream is closed after this
    max_pending_streams: int = 32  # streams past the certificate check still waiting for hello
    # Streams sending the model at once; the others wait, holding nothing (runtime/downloads.py).
    max_concurrent_downloads: int = 8


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    source: Path
    federation_id: str
    state_dir: Path
    listen: str
    tls: TlsConfig
    task_spec: str
    rounds: RoundsConfig
    deadlines: Deadlines
    train: Mapping[str, Any] = field(default_factory=dict)
    secagg: SecAggSettings | None = None  # None only with the insecure plaintext baseline
    # [plaintext]: what one update of the insecure baseline may be (norm, example count)
    plaintext: PlaintextLimits = field(default_factory=PlaintextLimits)
    # Masked vectors buffered at once (docs/secagg-protocol.md §5 step 3.8: P); None: chosen
    # from the vector's size (coordinator.runtime.uploads.upload_slots).
    max_concurrent_uploads: int | None = None
    server: ServerLimits = field(default_factory=ServerLimits)
    metrics: MetricsConfig | None = None
    debug: DebugConfig = field(default_factory=DebugConfig)
    # [server_optimizer]: the step from a round's FedAvg result to the next global model
    server_optimizer: ServerOptimizerSettings = field(default_factory=ServerOptimizerSettings)
    pki: PkiConfig = field(default_factory=PkiConfig)  # [pki]: renewal and expiry warnings

    @property
    def renewals_dir(self) -> Path:
        """Where renewal requests wait for approval, and approved certificates for pickup."""
        return self.pki.renewals_dir or self.state_dir / "renewals"

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


# ---- the file's schema: one strict model per table --------------------------------------------


def _federation_id(value: str) -> str:
    if not value or "/" in value:
        raise ValueError(f"must be a non-empty name without '/', got {value!r}")
    return value


def _ring_bits(value: int) -> int:
    if value not in (32, 64):
        raise ValueError(f"must be 32 or 64, got {value}")
    return value


def _graph_degree(value: int) -> int:
    if value < 2 or value % 2:
        raise ValueError(
            "must be an even number >= 2 (each silo has graph_degree/2 neighbours on either "
            f"side of the ring), got {value}"
        )
    return value


def _dropout_rate(value: float) -> float:
    if not 0 <= value < 1:
        raise ValueError(f"must be in [0, 1) (the share of silos lost in a round), got {value}")
    return value


def _train_table(train: dict[str, Any]) -> dict[str, Any]:
    """[train]: flat scalars only, sent to every silo inside the signed round configuration.
    `seed` and `round` are the silo's own (its training randomness is never the coordinator's)."""
    mu = train.get("proximal_mu")
    # FedProx's μ: a bad value would fail every silo's training, round after round.
    if mu is not None and (
        isinstance(mu, bool) or not isinstance(mu, int | float) or not 0 <= mu < float("inf")
    ):
        raise ValueError(f"proximal_mu must be a finite number >= 0 (FedProx's μ), got {mu!r}")
    try:
        parse_train_params(canonical_train_params(train), {})
    except (TrainParamsError, TypeError, ValueError) as exc:
        raise ValueError(f"cannot be sent to the silos: {exc}") from exc
    return train


class _Federation(StrictModel):
    id: Annotated[str, AfterValidator(_federation_id)]
    state_dir: schema.ConfigPath


class _Server(StrictModel):
    listen: schema.HostPort
    hello_timeout_s: schema.PositiveFloat = 10.0
    handshake_timeout_s: schema.PositiveFloat = 10.0
    idle_connection_s: schema.PositiveFloat = 60.0
    max_pending_streams: schema.PositiveInt = 32
    max_concurrent_downloads: schema.PositiveInt = 8


class _Tls(TlsFiles):
    revoked: schema.ConfigPath  # may not exist yet: no revocations


class _Rounds(StrictModel):
    count: schema.PositiveInt
    min_silos: schema.PositiveInt
    aggregation: Annotated[str, AfterValidator(check_aggregation_name)] = SECAGG
    silos_per_round: schema.PositiveInt | None = None
    start_timeout_s: schema.PositiveFloat = 120.0
    start_silos: schema.PositiveInt | None = None
    max_consecutive_aborts: schema.PositiveInt = 3
    abort_backoff_initial_s: schema.PositiveFloat = 1.0
    abort_backoff_max_s: schema.PositiveFloat = 60.0

    @model_validator(mode="after")
    def _silo_counts(self) -> Self:
        if self.aggregation == SECAGG and self.min_silos < 3:
            raise Problem(
                "min_silos",
                f"must be >= 3 with secure aggregation (its threshold floor), got {self.min_silos}",
            )
        if self.silos_per_round is not None and self.silos_per_round < self.min_silos:
            raise Problem("silos_per_round", f"must be >= min_silos ({self.min_silos})")
        if self.start_silos is not None and self.start_silos < self.min_silos:
            raise Problem("start_silos", f"must be >= min_silos ({self.min_silos})")
        if self.abort_backoff_initial_s > self.abort_backoff_max_s:
            raise Problem(
                "abort_backoff_initial_s",
                f"must be <= abort_backoff_max_s ({self.abort_backoff_max_s})",
            )
        return self


class _Deadlines(StrictModel):
    retired_keys: ClassVar[dict[str, str]] = {
        "heartbeat_s": "it was removed (liveness is gRPC keepalive now, docs/operations.md); "
        "delete the line"
    }
    offer_s: schema.PositiveFloat = 60.0
    train_s: schema.PositiveFloat = 300.0
    share_keys_s: schema.PositiveFloat = 60.0
    consistency_s: schema.PositiveFloat = 60.0
    unmask_s: schema.PositiveFloat = 60.0
    upload_progress_s: schema.PositiveFloat = 30.0


class _SecAgg(StrictModel):
    clip_l2: schema.PositiveFloat | None = None  # required with secagg: the file model checks it
    threshold: Annotated[int, schema.at_least(3, "the protocol's floor")] | None = None
    n_colluders: schema.NonNegativeInt | None = None
    ring_bits: Annotated[int, AfterValidator(_ring_bits)] = 32
    weighting: Annotated[str, schema.one_of([m.value for m in WeightingMode])] = "uniform"
    weight_max: schema.PositiveInt = 100_000
    noise_multiplier: schema.PositiveFloat | None = None
    noise_divisor: schema.PositiveInt = 1
    max_concurrent_uploads: schema.PositiveInt | None = None
    graph: Annotated[str, schema.one_of([m.value for m in GraphMode])] = GraphMode.COMPLETE.value
    graph_degree: Annotated[int, AfterValidator(_graph_degree)] | None = None
    dropout_rate: Annotated[float, AfterValidator(_dropout_rate)] | None = None

    @model_validator(mode="after")
    def _sparse_graph_keys(self) -> Self:
        # graph_degree and dropout_rate shape the Harary graph only; the degree's floor that
        # needs the roster (n_colluders unset) is checked when a round is built.
        for key in ("graph_degree", "dropout_rate"):
            if getattr(self, key) is not None and self.graph != GraphMode.HARARY.value:
                raise Problem(
                    key, 'is used only with graph = "harary"; set that, or delete the line'
                )
        if self.graph_degree is not None and self.dropout_rate is not None:
            raise Problem(
                "dropout_rate",
                "is not used when graph_degree is set (it only chooses the degree); delete one",
            )
        k, n_c = self.graph_degree, self.n_colluders
        if k is not None and n_c is not None and k < least_degree(n_c):
            raise Problem(
                "graph_degree",
                f"must be at least {least_degree(n_c)} (an even number above n_colluders = "
                f"{n_c}: below it a silo's neighbours may all be colluders), got {k}",
            )
        return self


class _Plaintext(StrictModel):
    """Read only with aggregation = "plaintext-insecure": each update is refused whole above
    these (an insecure baseline, but not an unchecked one)."""

    clip_l2: schema.PositiveFloat | None = None  # None: no norm bound (values must still be finite)
    weight_max: schema.PositiveInt = 100_000


def _server_optimizer_value(key: str) -> AfterValidator:
    def check(value: float) -> float:
        problem = server_optimizer_problem(key, value)
        if problem is not None:
            raise ValueError(problem)
        return value

    return AfterValidator(check)


class _ServerOptimizer(StrictModel):
    """Only the keys `method` uses may be set (SERVER_OPTIMIZERS); absent ones take its defaults."""

    method: Annotated[str, schema.one_of(list(SERVER_OPTIMIZERS))] = "fedavg"
    lr: Annotated[float, _server_optimizer_value("lr")] | None = None
    momentum: Annotated[float, _server_optimizer_value("momentum")] | None = None
    beta1: Annotated[float, _server_optimizer_value("beta1")] | None = None
    beta2: Annotated[float, _server_optimizer_value("beta2")] | None = None
    tau: Annotated[float, _server_optimizer_value("tau")] | None = None

    @model_validator(mode="after")
    def _only_the_method_s_keys(self) -> Self:
        uses = SERVER_OPTIMIZERS[self.method]
        for key in _SERVER_OPTIMIZER_KEYS:
            if getattr(self, key) is not None and key not in uses:
                takes = f"it uses {', '.join(sorted(uses))}" if uses else "it takes no keys"
                raise Problem(
                    key, f"is not used by method = {self.method!r} ({takes}); delete the line"
                )
        return self

    def settings(self) -> ServerOptimizerSettings:
        given = {
            k: getattr(self, k) for k in _SERVER_OPTIMIZER_KEYS if getattr(self, k) is not None
        }
        return ServerOptimizerSettings.of(self.method, **given)


class _Metrics(StrictModel):
    listen: schema.HostPort


class _Pki(StrictModel):
    auto_renew: bool = False
    issuing_cert: schema.ExistingFile | None = None
    issuing_key: schema.ExistingFile | None = None
    renew_valid_days: schema.PositiveInt = SILO_VALID_DAYS
    renewals_dir: schema.ConfigPath | None = None
    expiry_warning_days: schema.NonNegativeFloat = 30.0

    @model_validator(mode="after")
    def _auto_renew_needs_an_issuer(self) -> Self:
        if self.auto_renew and (self.issuing_cert is None or self.issuing_key is None):
            raise Problem(
                "auto_renew",
                "= true needs issuing_cert and issuing_key (the federation CA certificate and "
                "key that sign renewals); or set auto_renew = false to queue renewals for "
                "`silofed-coordinator pki approve`",
            )
        return self


class _Debug(StrictModel):
    pause_after_phase: Annotated[str, schema.one_of(PAUSE_POINTS)] | None = None


class _CoordinatorFile(StrictModel):
    federation: _Federation
    server: _Server
    tls: _Tls
    task: TaskTable
    rounds: _Rounds
    deadlines: _Deadlines = Field(default_factory=_Deadlines)
    secagg: _SecAgg = Field(default_factory=_SecAgg)
    plaintext: _Plaintext = Field(default_factory=_Plaintext)
    metrics: _Metrics | None = None
    debug: _Debug = Field(default_factory=_Debug)
    server_optimizer: _ServerOptimizer = Field(default_factory=_ServerOptimizer)
    pki: _Pki = Field(default_factory=_Pki)
    train: Annotated[dict[str, Any], AfterValidator(_train_table)] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _secagg_needs_a_clip(self) -> Self:
        # The clip norm is deployment-specific, so there is no default to fall back on.
        if self.rounds.aggregation == SECAGG and self.secagg.clip_l2 is None:
            raise Problem(
                ("secagg", "clip_l2"),
                "is missing: secure aggregation clips each silo's update to this L2 norm; "
                "set it a little above the norm of a typical update (see docs/secure-rounds.md)",
            )
        return self


def load_coordinator_config(path: Path) -> CoordinatorConfig:
    """Load and validate a coordinator config. Raises ConfigError naming the file, table and key
    of every problem found (one line each)."""
    path = Path(path).resolve()
    f = load_model(_CoordinatorFile, path, error=ConfigError)
    s = f.secagg
    secagg: SecAggSettings | None = None
    if f.rounds.aggregation == SECAGG:
        assert s.clip_l2 is not None  # refused by _CoordinatorFile when missing
        secagg = SecAggSettings(
            clip_l2=s.clip_l2,
            threshold=s.threshold,
            n_colluders=s.n_colluders,
            ring_bits=s.ring_bits,
            weighting=WeightingMode(s.weighting),
            weight_max=s.weight_max,
            dp_noise_multiplier=s.noise_multiplier,
            dp_noise_divisor=s.noise_divisor,
            graph=GraphMode(s.graph),
            graph_degree=s.graph_degree,
            dropout_rate=DEFAULT_DROPOUT_RATE if s.dropout_rate is None else s.dropout_rate,
        )
    # Where a table's keys are its dataclass's fields, the table is passed whole.
    return CoordinatorConfig(
        source=path,
        federation_id=f.federation.id,
        state_dir=f.federation.state_dir,
        listen=f.server.listen,
        tls=TlsConfig(**f.tls.model_dump()),
        task_spec=f.task.spec,
        rounds=RoundsConfig(**f.rounds.model_dump()),
        deadlines=Deadlines(**f.deadlines.model_dump()),
        train=dict(f.train),
        secagg=secagg,
        plaintext=PlaintextLimits(clip_l2=f.plaintext.clip_l2, weight_max=f.plaintext.weight_max),
        max_concurrent_uploads=s.max_concurrent_uploads,
        server=ServerLimits(
            hello_timeout_s=f.server.hello_timeout_s,
            handshake_timeout_s=f.server.handshake_timeout_s,
            idle_connection_s=f.server.idle_connection_s,
            max_pending_streams=f.server.max_pending_streams,
            max_concurrent_downloads=f.server.max_concurrent_downloads,
        ),
        metrics=None if f.metrics is None else MetricsConfig(listen=f.metrics.listen),
        debug=DebugConfig(pause_after_phase=f.debug.pause_after_phase),
        server_optimizer=f.server_optimizer.settings(),
        pki=PkiConfig(**f.pki.model_dump()),
    )
