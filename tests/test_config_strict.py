"""Strict configuration: every unknown key in every table of both roles' TOML files is refused,
naming the file, the table and the key, with a "did you mean"; so is an unknown table. The free
tables ([train], [task.options], [train_limits]) stay free. `check` reports the same line."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from coordinator.config import ConfigError as CoordinatorConfigError
from coordinator.config import load_coordinator_config
from silo_agent.config import ConfigError as SiloConfigError
from silo_agent.config import load_silo_config
from silofed.config_schema import ConfigError
from tests.federation_helpers import REPO, run_module
from tests.test_config import COORD, SILO, _files

# Table -> (a real key, a near miss an operator could type, a line that gives the table a valid
# body when the base file lacks it). Every table with fixed keys is here; the completeness tests
# below hold this list to the tables the loader itself knows.
COORD_TABLES: dict[str, tuple[str, str, str]] = {
    "federation": ("state_dir", "state_dri", ""),
    "server": ("listen", "listn", ""),
    "tls": ("roster", "rooster", ""),
    "task": ("spec", "specs", ""),
    "rounds": ("start_timeout_s", "start_timeout", ""),
    "deadlines": ("offer_s", "ofer_s", ""),
    "secagg": ("threshold", "treshold", "clip_l2 = 1.0"),
    "metrics": ("listen", "listne", 'listen = "127.0.0.1:0"'),
    "debug": ("pause_after_phase", "pause_after_phse", ""),
    "plaintext": ("clip_l2", "clip_l", ""),
    "server_optimizer": ("method", "metod", ""),
    "pki": ("auto_renew", "auto_renw", ""),
}
COORD_FREE = {"train"}

SILO_TABLES: dict[str, tuple[str, str, str]] = {
    "silo": ("state_dir", "stat_dir", ""),
    "coordinator": ("address", "adress", ""),
    "tls": ("roster", "rooster", ""),
    "task": ("options", "optons", ""),
    "reconnect": ("initial_s", "inital_s", ""),
    "secagg": ("allow_plaintext_insecure", "alow_plaintext_insecure", ""),
    "pki": ("renew_before_days", "renew_before_day", ""),
    "debug": ("pause_in_round", "pause_in_rund", ""),
    "train": ("workers", "worker", ""),
}
SILO_FREE = {"train_limits"}  # and [task.options], a sub-table of [task]

Loader = Callable[[Path], Any]
ROLES: dict[str, tuple[str, Loader, type[ConfigError]]] = {
    "coordinator": (COORD, load_coordinator_config, CoordinatorConfigError),
    "silo": (SILO, load_silo_config, SiloConfigError),
}


def with_key(text: str, table: str, line: str, body: str) -> str:
    """`text` with `line` added to `[table]` (the table appended, with `body`, if absent)."""
    header = f"\n[{table}]\n"
    if header in text:
        return text.replace(header, f"{header}{line}\n", 1)
    return f"{text}{header}{body}\n{line}\n"


def refusal(tmp_path: Path, role: str, text: str) -> ConfigError:
    base, load, error = ROLES[role]
    _files(tmp_path)
    path = tmp_path / f"{role}.toml"
    path.write_text(text)
    with pytest.raises(error) as info:
        load(path)
    return info.value


def cases(role: str, tables: dict[str, tuple[str, str, str]]) -> list[Any]:
    return [pytest.param(role, t, *spec, id=f"{role}-{t}") for t, spec in tables.items()]


@pytest.mark.parametrize(
    ("role", "table", "key", "typo", "body"),
    cases("coordinator", COORD_TABLES) + cases("silo", SILO_TABLES),
)
def test_a_near_miss_in_any_table_is_refused_with_the_key_it_meant(
    tmp_path: Path, role: str, table: str, key: str, typo: str, body: str
) -> None:
    base = ROLES[role][0]
    exc = refusal(tmp_path, role, with_key(base, table, f"{typo} = 1", body))
    path = tmp_path / f"{role}.toml"
    expected = f"{path}: [{table}] {typo} is not a known key of [{table}]; did you mean {key!r}?"
    assert exc.problems == (expected,)
    assert str(exc) == expected


@pytest.mark.parametrize(
    ("role", "typo", "meant"),
    [("coordinator", "deadline", "deadlines"), ("silo", "reconect", "reconnect")],
)
def test_an_unknown_table_is_refused_with_the_table_it_meant(
    tmp_path: Path, role: str, typo: str, meant: str
) -> None:
    exc = refusal(tmp_path, role, ROLES[role][0] + f"\n[{typo}]\nx = 1\n")
    path = tmp_path / f"{role}.toml"
    assert str(exc) == f"{path}: [{typo}] is not a known table; did you mean [{meant}]?"


@pytest.mark.parametrize(
    ("role", "tables"),
    [
        ("coordinator", set(COORD_TABLES) | COORD_FREE),
        ("silo", set(SILO_TABLES) | SILO_FREE),
    ],
)
def test_the_cases_above_cover_every_table_the_loader_knows(
    tmp_path: Path, role: str, tables: set[str]
) -> None:
    # With nothing close to suggest, the refusal lists the known tables: the loader's own list.
    exc = refusal(tmp_path, role, ROLES[role][0] + "\n[qqqqqqqq]\n")
    listed = re.search(r"\(known: (.*)\)$", str(exc))
    assert listed is not None, str(exc)
    assert set(re.findall(r"\[(\w+)\]", listed.group(1))) == tables


def test_every_problem_is_reported_at_once_one_line_each(tmp_path: Path) -> None:
    text = with_key(COORD, "deadlines", "ofer_s = 5", "")
    text = with_key(text, "rounds", "max_concurrent_uploads = 3", "").replace(
        "count = 3", 'count = "3"'
    )
    exc = refusal(tmp_path, "coordinator", text)
    path = tmp_path / "coordinator.toml"
    assert sorted(exc.problems) == sorted(
        [
            f"{path}: [rounds] count must be int, got str",
            f"{path}: [rounds] max_concurrent_uploads is not a known key of [rounds]; "
            "did you mean [secagg] max_concurrent_uploads?",
            f"{path}: [deadlines] ofer_s is not a known key of [deadlines]; "
            "did you mean 'offer_s'?",
        ]
    )
    assert str(exc).splitlines() == list(exc.problems)


def test_a_key_with_no_near_miss_lists_the_table_keys(tmp_path: Path) -> None:
    exc = refusal(tmp_path, "silo", with_key(SILO, "reconnect", "zzzz = 1", ""))
    assert str(exc).endswith(
        "[reconnect] zzzz is not a known key of [reconnect] (known: initial_s, max_s)"
    )


def test_a_key_outside_every_table_is_refused(tmp_path: Path) -> None:
    exc = refusal(tmp_path, "silo", "offer_s = 5\n" + SILO)
    assert "offer_s is outside every table; every key belongs in one of [coordinator]" in str(exc)


def test_the_free_tables_stay_free(tmp_path: Path) -> None:
    _files(tmp_path)
    coord = tmp_path / "c.toml"
    coord.write_text(with_key(COORD, "train", 'optimizer = "sgd"', ""))
    assert load_coordinator_config(coord).train["optimizer"] == "sgd"
    silo = tmp_path / "s.toml"
    silo.write_text(
        with_key(SILO, "task.options", 'csv = "data.csv"', "")
        + "\n[train_limits]\nbatch_size = 64\n"
    )
    cfg = load_silo_config(silo)
    assert cfg.task_options == {"silo_index": 1, "csv": "data.csv"}
    assert cfg.secagg.train_limits == {"epochs": 100.0, "batch_size": 64.0}


def test_free_tables_still_check_their_values(tmp_path: Path) -> None:
    exc = refusal(tmp_path, "silo", SILO + "\n[train_limits]\nepochs = 0\n")
    assert str(exc).endswith("[train_limits] epochs must be a number > 0, got 0")
    exc = refusal(tmp_path, "coordinator", with_key(COORD, "train", "seed = 1", ""))
    assert "[train] cannot be sent to the silos: training parameter 'seed'" in str(exc)
    for bad in ("-0.1", "nan", "true", '"0.1"'):
        exc = refusal(tmp_path, "coordinator", with_key(COORD, "train", f"proximal_mu = {bad}", ""))
        assert "[train] proximal_mu must be a finite number >= 0" in str(exc), (bad, exc)


def test_the_keys_added_for_recovery_are_read_and_checked(tmp_path: Path) -> None:
    _files(tmp_path)
    coord = tmp_path / "c.toml"
    stall = "max_consecutive_aborts = 2\nabort_backoff_initial_s = 0.5\nabort_backoff_max_s = 4"
    coord.write_text(with_key(COORD, "rounds", stall, ""))
    rounds = load_coordinator_config(coord).rounds
    assert (rounds.max_consecutive_aborts, rounds.abort_backoff_initial_s) == (2, 0.5)
    assert rounds.abort_backoff_max_s == 4.0
    exc = refusal(
        tmp_path, "coordinator", with_key(COORD, "rounds", "abort_backoff_initial_s = 90", "")
    )
    assert str(exc).endswith(
        "[rounds] abort_backoff_initial_s must be <= abort_backoff_max_s (60.0)"
    )
    exc = refusal(
        tmp_path, "coordinator", with_key(COORD, "rounds", "max_consecutive_aborts = 0", "")
    )
    assert str(exc).endswith("[rounds] max_consecutive_aborts must be > 0, got 0")
    silo = tmp_path / "s.toml"
    silo.write_text(
        with_key(
            with_key(SILO, "tls", 'roster_updates = "manual"', ""),
            "silo",
            "keep_final_model = true",
            "",
        )
    )
    cfg = load_silo_config(silo)
    assert cfg.tls.roster_updates == "manual" and cfg.keep_final_model is True
    exc = refusal(tmp_path, "silo", with_key(SILO, "tls", 'roster_updates = "auto"', ""))
    assert str(exc).endswith("[tls] roster_updates must be one of ['signed', 'manual'], got 'auto'")


def test_the_side_errors_share_one_base() -> None:
    assert issubclass(CoordinatorConfigError, ConfigError)
    assert issubclass(SiloConfigError, ConfigError)
    assert not issubclass(CoordinatorConfigError, SiloConfigError)


@pytest.mark.e2e
def test_check_refuses_an_unknown_key_with_the_same_message(tmp_path: Path) -> None:
    _files(tmp_path)
    path = tmp_path / "silo.toml"
    path.write_text(with_key(SILO, "secagg", "alow_plaintext_insecure = true", ""))
    with pytest.raises(SiloConfigError) as info:
        load_silo_config(path)
    done = run_module("silo_agent", "check", "--config", str(path))
    assert done.returncode != 0, done.stdout + done.stderr
    assert done.stdout.startswith("FAIL config"), done.stdout
    assert str(info.value) in done.stdout
    assert "did you mean 'allow_plaintext_insecure'?" in done.stdout
    assert "OK" not in done.stdout


@pytest.mark.e2e
def test_serve_refuses_an_unknown_key_before_listening(tmp_path: Path) -> None:
    _files(tmp_path)
    path = tmp_path / "coordinator.toml"
    path.write_text(with_key(COORD, "deadlines", "ofer_s = 5", ""))
    done = run_module("coordinator", "serve", "--config", str(path))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "[deadlines] ofer_s is not a known key of [deadlines]; did you mean 'offer_s'?" in (
        done.stdout + done.stderr
    )
    assert not (tmp_path / "state").exists()


def documented_example(heading: str) -> str:
    """The ```toml block under `heading` in docs/operations.md."""
    text = (REPO / "docs" / "operations.md").read_text()
    found = re.search(re.escape(heading) + r"\n.*?```toml\n(.*?)```", text, re.S)
    assert found is not None, f"no toml block under {heading!r} in docs/operations.md"
    return found.group(1)


@pytest.mark.parametrize(
    ("heading", "load"),
    [("### coordinator.toml", load_coordinator_config), ("### silo.toml", load_silo_config)],
)
def test_the_documented_examples_use_only_known_keys(
    tmp_path: Path, heading: str, load: Loader
) -> None:
    example = documented_example(heading)
    for name in re.findall(r'^(?:ca_cert|cert|key|roster) = "([^"]+)"', example, re.M):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    path = tmp_path / "example.toml"
    path.write_text(example)
    load(path)  # raises, naming the key, if the docs show one the loader does not know


def test_a_retired_key_says_why_it_is_gone(tmp_path: Path) -> None:
    exc = refusal(tmp_path, "coordinator", with_key(COORD, "deadlines", "heartbeat_s = 5", ""))
    path = tmp_path / "coordinator.toml"
    assert list(exc.problems) == [
        f"{path}: [deadlines] heartbeat_s is not a known key of [deadlines]: it was removed "
        "(liveness is gRPC keepalive now, docs/operations.md); delete the line"
    ]
