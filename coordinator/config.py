"""The coordinator's TOML configuration, loaded once at start into frozen dataclasses.

Rule: every check happens here, before anything listens or trains, and every error names the
file and the key (`ConfigError`). Relative paths are resolved against the config file's folder.
Nothing else in the coordinator reads TOML or environment variables.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.aggregation import AggregationError, check_aggregation_name
from coordinator.secure_round import SECAGG, SecAggSettings, WeightingMode


class ConfigError(ValueError):
    """A configuration file is missing, unparsable, or has a bad key; str() says which."""


@dataclass(frozen=True, slots=True)
class TlsConfig:
    ca_cert: Path
    cert: Path
    key: Path
    roster: Path
    revoked: Path


@dataclass(frozen=True, slots=True)
class RoundsConfig:
    count: int
    min_silos: int
    aggregation: str
    silos_per_round: int | None = None
    start_timeout_s: float = 120.0
    start_silos: int | None = None  # silos to wait for before the first round (default min_silos)


@dataclass(frozen=True, slots=True)
class Deadlines:
    """Per-phase deadlines in seconds; a silo that misses one drops out of that round."""

    offer_s: float = 60.0  # model download (+ the key advertisement under secagg)
    train_s: float = 300.0  # local training + upload (the masked phase under secagg)
    heartbeat_s: float = 5.0
    share_keys_s: float = 60.0  # secagg phases that need no training:
    consistency_s: float = 60.0
    unmask_s: float = 60.0


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
    max_concurrent_uploads: int = 2  # masked vectors buffered at once (SECAGG.md §3.8: P)

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


class _Reader:
    """Typed access to one TOML document whose errors say `<file>: [table] key ...`."""

    def __init__(self, path: Path, data: Mapping[str, Any]) -> None:
        self.path = path
        self.data = data

    def fail(self, where: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: {where} {problem}")

    def table(self, name: str, *, required: bool = True) -> Mapping[str, Any]:
        value = self.data.get(name)
        if value is None:
            if required:
                raise self.fail(f"[{name}]", "table is missing")
            return {}
        if not isinstance(value, dict):
            raise self.fail(f"[{name}]", "must be a table")
        return value

    def get(self, table: str, key: str, kind: type, default: Any = ...) -> Any:
        tbl = self.table(table, required=default is ...)
        where = f"[{table}] {key}"
        if key not in tbl:
            if default is ...:
                raise self.fail(where, "is missing")
            return default
        value = tbl[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self.fail(where, f"must be {kind.__name__}, got {type(value).__name__}")
        return value

    def path_of(self, table: str, key: str) -> Path:
        raw = self.get(table, key, str)
        if not raw:
            raise self.fail(f"[{table}] {key}", "is empty")
        p = Path(raw).expanduser()
        return p if p.is_absolute() else (self.path.parent / p).resolve()

    def existing_file(self, table: str, key: str) -> Path:
        p = self.path_of(table, key)
        if not p.is_file():
            raise self.fail(f"[{table}] {key}", f"names {p}, which does not exist")
        return p

    def positive(self, table: str, key: str, kind: type, default: Any = ...) -> Any:
        value = self.get(table, key, kind, default)
        if value is not None and value <= 0:
            raise self.fail(f"[{table}] {key}", f"must be > 0, got {value}")
        return value


def read_toml(path: Path) -> Mapping[str, Any]:
    """Parse a TOML file. Raises ConfigError naming the file."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: configuration file not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def check_listen(reader: _Reader, table: str, key: str, value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise reader.fail(f"[{table}] {key}", f"must be host:port (port 0-65535), got {value!r}")
    return value


def load_coordinator_config(path: Path) -> CoordinatorConfig:
    """Load and validate a coordinator config. Raises ConfigError naming the file and key."""
    path = Path(path).resolve()
    r = _Reader(path, read_toml(path))
    fed = r.get("federation", "id", str)
    if not fed or "/" in fed:
        raise r.fail("[federation] id", f"must be a non-empty name without '/', got {fed!r}")
    state_dir = r.path_of("federation", "state_dir")
    listen = check_listen(r, "server", "listen", r.get("server", "listen", str))
    tls = TlsConfig(
        ca_cert=r.existing_file("tls", "ca_cert"),
        cert=r.existing_file("tls", "cert"),
        key=r.existing_file("tls", "key"),
        roster=r.existing_file("tls", "roster"),
        revoked=r.path_of("tls", "revoked"),  # may not exist yet: no revocations
    )
    spec = r.get("task", "spec", str)
    if ":" not in spec:
        raise r.fail("[task] spec", f"must look like 'package.module:attribute', got {spec!r}")
    aggregation = r.get("rounds", "aggregation", str, SECAGG)
    try:
        check_aggregation_name(aggregation)
    except AggregationError as e:
        raise r.fail("[rounds] aggregation", str(e)) from None
    min_silos = r.positive("rounds", "min_silos", int)
    if aggregation == SECAGG and min_silos < 3:
        raise r.fail(
            "[rounds] min_silos",
            f"must be >= 3 with secure aggregation (its threshold floor), got {min_silos}",
        )
    per_round = r.positive("rounds", "silos_per_round", int, None)
    if per_round is not None and per_round < min_silos:
        raise r.fail("[rounds] silos_per_round", f"must be >= min_silos ({min_silos})")
    rounds = RoundsConfig(
        count=r.positive("rounds", "count", int),
        min_silos=min_silos,
        aggregation=aggregation,
        silos_per_round=per_round,
        start_timeout_s=r.positive("rounds", "start_timeout_s", float, 120.0),
        start_silos=r.positive("rounds", "start_silos", int, None),
    )
    if rounds.start_silos is not None and rounds.start_silos < min_silos:
        raise r.fail("[rounds] start_silos", f"must be >= min_silos ({min_silos})")
    deadlines = Deadlines(
        offer_s=r.positive("deadlines", "offer_s", float, 60.0),
        train_s=r.positive("deadlines", "train_s", float, 300.0),
        heartbeat_s=r.positive("deadlines", "heartbeat_s", float, 5.0),
        share_keys_s=r.positive("deadlines", "share_keys_s", float, 60.0),
        consistency_s=r.positive("deadlines", "consistency_s", float, 60.0),
        unmask_s=r.positive("deadlines", "unmask_s", float, 60.0),
    )
    secagg = _secagg_settings(r) if aggregation == SECAGG else None
    # [metrics] is read and checked by coordinator.metrics when the server starts.
    known = {
        "federation",
        "server",
        "tls",
        "task",
        "rounds",
        "deadlines",
        "train",
        "metrics",
        "secagg",
    }
    unknown = sorted(set(r.data) - known)
    if unknown:
        raise r.fail(f"[{unknown[0]}]", f"is not a known table (known: {sorted(known)})")
    return CoordinatorConfig(
        source=path,
        federation_id=fed,
        state_dir=state_dir,
        listen=listen,
        tls=tls,
        task_spec=spec,
        rounds=rounds,
        deadlines=deadlines,
        train=dict(r.table("train", required=False)),
        secagg=secagg,
        max_concurrent_uploads=r.positive("secagg", "max_concurrent_uploads", int, 2),
    )


_SECAGG_KEYS = frozenset(
    {
        "clip_l2",
        "threshold",
        "n_colluders",
        "ring_bits",
        "weighting",
        "weight_max",
        "noise_multiplier",
        "noise_divisor",
        "max_concurrent_uploads",
    }
)


def _secagg_settings(r: _Reader) -> SecAggSettings:
    """[secagg]: the clip norm is required (it is deployment-specific: SECAGG.md §9)."""
    table = r.table("secagg", required=False)
    unknown = sorted(set(table) - _SECAGG_KEYS)
    if unknown:
        raise r.fail(
            f"[secagg] {unknown[0]}", f"is not a known key (known: {sorted(_SECAGG_KEYS)})"
        )
    if "clip_l2" not in table:
        raise r.fail(
            "[secagg] clip_l2",
            "is missing: secure aggregation clips each silo's update to this L2 norm; "
            "set it a little above the norm of a typical update (see docs/secure-rounds.md)",
        )
    ring_bits = r.get("secagg", "ring_bits", int, 32)
    if ring_bits not in (32, 64):
        raise r.fail("[secagg] ring_bits", f"must be 32 or 64, got {ring_bits}")
    weighting = r.get("secagg", "weighting", str, WeightingMode.EXAMPLES.value)
    modes = [m.value for m in WeightingMode]
    if weighting not in modes:
        raise r.fail("[secagg] weighting", f"must be one of {modes}, got {weighting!r}")
    n_colluders = r.get("secagg", "n_colluders", int, None)
    if n_colluders is not None and n_colluders < 0:
        raise r.fail("[secagg] n_colluders", f"must be >= 0, got {n_colluders}")
    threshold = r.get("secagg", "threshold", int, None)
    if threshold is not None and threshold < 3:
        raise r.fail("[secagg] threshold", f"must be >= 3 (the protocol's floor), got {threshold}")
    return SecAggSettings(
        clip_l2=r.positive("secagg", "clip_l2", float),
        threshold=threshold,
        n_colluders=n_colluders,
        ring_bits=ring_bits,
        weighting=WeightingMode(weighting),
        weight_max=r.positive("secagg", "weight_max", int, 100_000),
        dp_noise_multiplier=r.positive("secagg", "noise_multiplier", float, None),
        dp_noise_divisor=r.positive("secagg", "noise_divisor", int, 1),
    )
