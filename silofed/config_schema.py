"""Strict TOML configuration: the schema machinery both roles build their config files on.

Rule: a configuration file is read once and validated whole against a strict pydantic model
(`StrictModel`: unknown keys and tables refused, no coercion but int -> float), and every problem
found becomes one line `<file>: [table] key <problem>` of a single ConfigError, so an operator
fixes every typo in one pass. An unknown key or table gets a "did you mean" from the names its
table knows. Relative paths resolve against the config file's folder. Of the roles' keys this
module knows only those both have (`TlsFiles`, `TaskTable`): each role declares its tables as
StrictModel subclasses (extending those two) and subclasses ConfigError.

pydantic does the walking (types, ranges, unknown keys, with the exact location of each problem);
what is ours is the wording, which speaks TOML (tables, keys) rather than Python.
"""

from __future__ import annotations

import difflib
import tomllib
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
)
from pydantic_core import ErrorDetails

__all__ = [
    "ConfigError",
    "ConfigPath",
    "ExistingFile",
    "HostPort",
    "NonNegativeFloat",
    "NonNegativeInt",
    "PositiveFloat",
    "PositiveInt",
    "Problem",
    "StrictModel",
    "TaskSpec",
    "TaskTable",
    "TlsFiles",
    "TlsPaths",
    "at_least",
    "check_host_port",
    "load_model",
    "one_of",
    "problem_lines",
    "read_toml",
]


class ConfigError(ValueError):
    """A configuration file is missing, unparsable, or has bad keys. str() holds one line per
    problem, each `<file>: [table] key <problem>`; `problems` holds the lines."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems) or (message,)


class Problem(ValueError):
    """Raised by a model validator for a rule that spans keys: `at` names the key (or the table
    and key) the problem is reported at, relative to the model whose validator raised it."""

    def __init__(self, at: str | tuple[str, ...], problem: str) -> None:
        super().__init__(problem)
        self.at: tuple[str, ...] = (at,) if isinstance(at, str) else at


class StrictModel(BaseModel):
    """One TOML table (or the whole file): unknown keys refused, values of the declared TOML type
    only — an int is accepted where a float is declared, since TOML writes 5 for 5.0 — and
    immutable once read."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# ---- value types every role uses ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Context:
    base: Path  # the config file's folder: relative paths resolve against it


def _resolved(value: object, info: ValidationInfo) -> Path:
    if not isinstance(value, str):
        raise ValueError(f"must be str, got {_kind(value)}")
    if not value:
        raise ValueError("is empty")
    context = info.context
    if not isinstance(context, _Context):  # a programming error, not an operator's
        raise TypeError("config models are validated through silofed.config_schema.load_model")
    path = Path(value).expanduser()
    return path if path.is_absolute() else (context.base / path).resolve()


def _existing_file(value: object, info: ValidationInfo) -> Path:
    path = _resolved(value, info)
    if not path.is_file():
        raise ValueError(f"names {path}, which does not exist")
    return path


def check_host_port(value: str) -> str:
    """`value` if it is host:port with a port in 0-65535; else ValueError saying so."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"must be host:port (port 0-65535), got {value!r}")
    return value


def _check_task_spec(value: str) -> str:
    if ":" not in value:
        raise ValueError(f"must look like 'package.module:attribute', got {value!r}")
    return value


ConfigPath = Annotated[Path, BeforeValidator(_resolved)]  # a path; may not exist yet
ExistingFile = Annotated[Path, BeforeValidator(_existing_file)]
HostPort = Annotated[str, AfterValidator(check_host_port)]
TaskSpec = Annotated[str, AfterValidator(_check_task_spec)]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]


# ---- the tables both roles have ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TlsPaths:
    """[tls] as the rest of a role sees it; each role's dataclass adds its own keys' fields."""

    ca_cert: Path
    cert: Path
    key: Path
    roster: Path


class TlsFiles(StrictModel):
    """[tls]: this side's CA, certificate and key, and the roster it pins; each role adds its own
    keys by subclassing (with fields of the same names in its TlsPaths subclass)."""

    ca_cert: ExistingFile
    cert: ExistingFile
    key: ExistingFile
    roster: ExistingFile


class TaskTable(StrictModel):
    """[task]: the task the federation trains, as `package.module:attribute`."""

    spec: TaskSpec


def one_of(choices: Sequence[Any]) -> AfterValidator:
    """A validator refusing any value not in `choices`, listing them."""

    def check(value: Any) -> Any:
        if value not in choices:
            raise ValueError(f"must be one of {list(choices)}, got {value!r}")
        return value

    return AfterValidator(check)


def at_least(floor: int, why: str) -> AfterValidator:
    """A validator refusing integers below `floor`, saying `why` the floor is there."""

    def check(value: int) -> int:
        if value < floor:
            raise ValueError(f"must be >= {floor} ({why}), got {value}")
        return value

    return AfterValidator(check)


# ---- reading and validating a file ----------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


def read_toml(path: Path, *, error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """Parse a TOML file. Raises `error` naming the file."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise error(f"{path}: configuration file not found") from exc
    except IsADirectoryError as exc:
        raise error(f"{path}: is a folder, not a configuration file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: not valid TOML: {exc}") from exc


def load_model(model: type[M], path: Path, *, error: type[ConfigError] = ConfigError) -> M:
    """Read the TOML file at `path` (absolute) and validate it against `model`.
    Raises `error` with one line per problem found."""
    data = read_toml(path, error=error)
    try:
        return model.model_validate(data, context=_Context(base=path.parent))
    except ValidationError as exc:
        lines = problem_lines(path, model, exc.errors())
        raise error("\n".join(lines), lines) from exc


def problem_lines(path: Path, model: type[BaseModel], errors: Sequence[ErrorDetails]) -> list[str]:
    """One `<file>: [table] key <problem>` line per pydantic error (duplicates dropped)."""
    lines: list[str] = []
    for err in errors:
        loc = tuple(str(part) for part in err["loc"])
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, Problem):
            loc += cause.at
        line = f"{path}: {_describe(err, loc, model)}"
        if line not in lines:
            lines.append(line)
    return lines


# pydantic's error type -> the TOML type the key needed
_EXPECTED = {
    "int_type": "int",
    "float_type": "float",
    "string_type": "str",
    "bool_type": "bool",
    "dict_type": "a table",
    "model_type": "a table",
}


def _where(loc: tuple[str, ...]) -> str:
    if not loc:
        return ""
    table, *key = loc
    return f"[{table}] {'.'.join(key)} " if key else f"[{table}] "


def _describe(err: ErrorDetails, loc: tuple[str, ...], model: type[BaseModel]) -> str:
    kind, value, ctx = err["type"], err["input"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        return _unknown(loc, model, value)
    problem: str
    if kind == "missing":
        problem = "table is missing" if len(loc) == 1 else "is missing"
    elif kind in _EXPECTED:
        problem = f"must be {_EXPECTED[kind]}, got {_kind(value)}"
    elif kind in ("greater_than", "greater_than_equal"):
        op = ">" if kind == "greater_than" else ">="
        bound = ctx["gt"] if kind == "greater_than" else ctx["ge"]
        problem = f"must be {op} {_number(bound)}, got {_number(value)}"
    elif kind in ("value_error", "assertion_error") and "error" in ctx:
        problem = str(ctx["error"])
    elif kind == "literal_error":
        problem = f"must be one of {ctx['expected']}, got {value!r}"
    else:  # a check of pydantic's we do not word ourselves: its own sentence, still located
        problem = f"is invalid: {err['msg']}"
    return _where(loc) + problem


def _unknown(loc: tuple[str, ...], model: type[BaseModel], value: object) -> str:
    *parents, name = loc
    table_model = _model_at(model, parents)
    known = sorted(table_model.model_fields) if table_model is not None else []
    close = difflib.get_close_matches(name, known, n=1)
    if not parents:
        tables = ", ".join(f"[{k}]" for k in known)
        if not isinstance(value, dict):  # `key = value` above the first [table] header
            return f"{name} is outside every table; every key belongs in one of {tables}"
        if close:
            return f"[{name}] is not a known table; did you mean [{close[0]}]?"
        return f"[{name}] is not a known table (known: {tables})"
    table = ".".join(parents)
    head = f"[{table}] {name} is not a known key of [{table}]"
    # A table may name keys it no longer has, with why (a ClassVar `retired_keys`).
    retired: dict[str, str] = getattr(table_model, "retired_keys", {})
    if name in retired:
        return f"{head}: {retired[name]}"
    if close:
        return f"{head}; did you mean {close[0]!r}?"
    # Right key, wrong table (e.g. max_concurrent_uploads under [rounds]): name the right one.
    elsewhere = _tables_with_key(model, parents[:-1], name)
    if elsewhere:
        return f"{head}; did you mean [{elsewhere[0]}] {name}?"
    return f"{head} (known: {', '.join(known)})"


def _tables_with_key(model: type[BaseModel], parents: list[str], key: str) -> list[str]:
    outer = _model_at(model, parents)
    if outer is None:
        return []
    found = []
    for name in outer.model_fields:
        inner = _model_at(outer, [name])
        if inner is not None and key in inner.model_fields:
            found.append(".".join([*parents, name]))
    return found


def _model_at(model: type[BaseModel], path: Sequence[str]) -> type[BaseModel] | None:
    """The model of the table at `path` below `model`, or None if that is not a model."""
    current: type[BaseModel] | None = model
    for part in path:
        field = current.model_fields.get(part) if current is not None else None
        current = _model_in(field.annotation) if field is not None else None
    return current


def _model_in(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):  # `Table | None`, Annotated[Table, ...]
        found = _model_in(arg)
        if found is not None:
            return found
    return None


_TOML_KINDS: dict[type, str] = {dict: "table", list: "array"}


def _kind(value: object) -> str:
    return _TOML_KINDS.get(type(value), type(value).__name__)


def _number(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
