"""Each CLI's exit-code table (silofed.cli.ExitOn): every row names a real exception class, a
command's error ends it with its row's code and one line, and an error no row names is not
swallowed. In process; the end-to-end exit codes are tests/test_cli_errors.py's."""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from coordinator import cli as coordinator_cli
from silo_agent import cli as silo_cli
from silofed.cli import ExitOn, Program, resolve


@pytest.mark.parametrize(
    "row",
    [*coordinator_cli.EXIT_CODES, *silo_cli.EXIT_CODES],
    ids=lambda row: f"{row.command}-{row.code}-{row.errors[0].rsplit(':', 1)[-1]}",
)
def test_every_row_names_an_exception_class_of_an_existing_command(row: ExitOn) -> None:
    for name in row.errors:
        assert issubclass(resolve(name), Exception), name
    program = coordinator_cli.PROGRAM if row in coordinator_cli.EXIT_CODES else silo_cli.PROGRAM
    commands = program.parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert row.command in commands, (row.command, sorted(commands))


def test_a_preflight_refusal_has_the_code_of_the_coordinators_refusal() -> None:
    from silo_agent.runtime.runner import EXIT_REFUSED

    (row,) = [r for r in silo_cli.EXIT_CODES if any("PreflightError" in e for e in r.errors)]
    assert row.code == EXIT_REFUSED


class Broken(Exception):
    pass


class Unlisted(Exception):
    pass


def _program(raises: Exception, *rows: ExitOn) -> Program:
    """A program whose commands `boom` and `other` raise `raises`."""

    def register(sub: argparse._SubParsersAction[Any]) -> None:
        for name in ("boom", "other"):
            sub.add_parser(name).set_defaults(func=lambda args: (_ for _ in ()).throw(raises))

    module = types.SimpleNamespace(register=register)
    return Program("prog", "a test program", (module,), exit_codes=rows, logger="test.exit")


BROKEN = f"{__name__}:Broken"


def test_a_listed_error_ends_its_command_with_the_rows_code_and_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    program = _program(Broken("the file is missing; pass --x"), ExitOn("boom", 7, (BROKEN,)))
    assert program.main(["boom"]) == 7
    captured = capsys.readouterr()
    assert captured.err == "error: the file is missing; pass --x\n"
    assert captured.out == ""


def test_a_logged_row_goes_to_the_roles_logger_with_its_prefix(
    caplog: pytest.LogCaptureFixture,
) -> None:
    row = ExitOn("boom", 2, (BROKEN,), logged=True, prefix="cannot start: ")
    with caplog.at_level("ERROR", logger="test.exit"):
        assert _program(Broken("port in use"), row).main(["boom"]) == 2
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("test.exit", "cannot start: port in use")
    ]


def test_an_error_no_row_names_propagates() -> None:
    program = _program(Unlisted("a bug"), ExitOn("boom", 2, (BROKEN,)))
    with pytest.raises(Unlisted):
        program.main(["boom"])


def test_a_row_applies_to_its_command_only() -> None:
    program = _program(Broken("x"), ExitOn("boom", 2, (BROKEN,)))
    with pytest.raises(Broken):
        program.main(["other"])


def test_a_class_whose_module_is_not_loaded_matches_nothing_and_is_not_imported() -> None:
    name = "tests.never_imported_module_for_exit_codes"
    assert name not in sys.modules
    program = _program(Broken("x"), ExitOn("boom", 2, (f"{name}:Broken",)))
    with pytest.raises(Broken):
        program.main(["boom"])
    assert name not in sys.modules


def test_rounds_errors_end_the_coordinator_cli_with_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere"
    assert coordinator_cli.main(["rounds", "list", "--state-dir", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: state directory {missing} does not exist"), err


def test_ledger_errors_end_the_silo_cli_with_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert silo_cli.main(["ledger"]) == 1
    err = capsys.readouterr().err
    assert err == "error: say which silo: --config FILE (the silo's TOML) or --state-dir DIR\n"


def test_a_ledger_config_error_ends_the_silo_cli_with_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "silo.toml"
    bad.write_text("[silo]\nname = 3\n")
    assert silo_cli.main(["ledger", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err, err
