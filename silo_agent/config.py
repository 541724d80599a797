"""The silo agent's TOML configuration, loaded once at start into frozen dataclasses.

Rule: every check happens here, before the agent dials, and every error names the file and the
key (`ConfigError`). Relative paths are resolved against the config file's folder. The silo's
identity is NOT configured: it is the URI SAN of its certificate; `[silo] name`/`id` is only
checked against it so a mix-up of files is caught at start.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration file is missing, unparsable, or has a bad key; str() says which."""


@dataclass(frozen=True, slots=True)
class SiloTls:
    ca_cert: Path
    cert: Path
    key: Path
    roster: Path


@dataclass(frozen=True, slots=True)
class Reconnect:
    """Exponential backoff with full jitter between `initial_s` and `max_s`."""

    initial_s: float = 0.5
    max_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError("reconnect delays need 0 < initial_s <= max_s")


# Where `[debug] pause_after_phase` may stop a silo (tests kill it there): after the offer
# arrived, after sending its key advertisement, its shares, its masked upload, its signature.
PAUSE_POINTS = ("offer", "advertise", "share_keys", "masked", "consistency")


@dataclass(frozen=True, slots=True)
class SecAggPolicy:
    """`[secagg]`: what this silo accepts (SECAGG.md §3.3 local policy)."""

    allow_plaintext_insecure: bool = False  # send the update IN THE CLEAR when asked to
    max_masked_inputs_per_model: int = 1
    t_floor: int = 3
    n_colluders_max: int | None = None


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


def load_silo_config(path: Path) -> SiloConfig:
    """Load and validate a silo config. Raises ConfigError naming the file and key."""
    path = Path(path).resolve()
    r = _Reader(path, read_toml(path))
    name = r.get("silo", "name", str, None)
    silo_id = r.get("silo", "id", str, None)
    if name is None and silo_id is None:
        raise r.fail("[silo] name", "is missing (give `name` or `id`)")
    if silo_id is not None and not silo_id.startswith("spiffe://"):
        raise r.fail("[silo] id", f"must be a spiffe:// URI, got {silo_id!r}")
    address = check_listen(r, "coordinator", "address", r.get("coordinator", "address", str))
    if address.endswith(":0"):
        raise r.fail("[coordinator] address", "needs the coordinator's real port, not 0")
    initial = r.positive("reconnect", "initial_s", float, 0.5)
    max_s = r.positive("reconnect", "max_s", float, 30.0)
    if initial > max_s:
        raise r.fail("[reconnect] initial_s", f"must be <= max_s ({max_s})")
    spec = r.get("task", "spec", str)
    if ":" not in spec:
        raise r.fail("[task] spec", f"must look like 'package.module:attribute', got {spec!r}")
    task = r.table("task")
    options = task.get("options", {})
    if not isinstance(options, dict):
        raise r.fail("[task.options]", "must be a table")
    pause = r.get("debug", "pause_after_phase", str, None)
    if pause is not None and pause not in PAUSE_POINTS:
        raise r.fail(
            "[debug] pause_after_phase", f"must be one of {list(PAUSE_POINTS)}, got {pause!r}"
        )
    t_floor = r.get("secagg", "t_floor", int, 3)
    if t_floor < 3:
        raise r.fail("[secagg] t_floor", f"must be >= 3 (the protocol's floor), got {t_floor}")
    n_c_max = r.get("secagg", "n_colluders_max", int, None)
    if n_c_max is not None and n_c_max < 0:
        raise r.fail("[secagg] n_colluders_max", f"must be >= 0, got {n_c_max}")
    policy = SecAggPolicy(
        allow_plaintext_insecure=r.get("secagg", "allow_plaintext_insecure", bool, False),
        max_masked_inputs_per_model=r.positive("secagg", "max_masked_inputs_per_model", int, 1),
        t_floor=t_floor,
        n_colluders_max=n_c_max,
    )
    known = {"silo", "coordinator", "tls", "task", "reconnect", "secagg", "debug"}
    unknown = sorted(set(r.data) - known)
    if unknown:
        raise r.fail(f"[{unknown[0]}]", f"is not a known table (known: {sorted(known)})")
    return SiloConfig(
        source=path,
        name=name,
        silo_id=silo_id,
        state_dir=r.path_of("silo", "state_dir"),
        address=address,
        server_name=r.get("coordinator", "server_name", str, None),
        tls=SiloTls(
            ca_cert=r.existing_file("tls", "ca_cert"),
            cert=r.existing_file("tls", "cert"),
            key=r.existing_file("tls", "key"),
            roster=r.existing_file("tls", "roster"),
        ),
        task_spec=spec,
        task_options=dict(options),
        reconnect=Reconnect(initial, max_s),
        secagg=policy,
        pause_after_phase=pause,
        pause_in_round=r.positive("debug", "pause_in_round", int, None),
    )
