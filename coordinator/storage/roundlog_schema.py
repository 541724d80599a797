"""The round log's SQLite schema, and how a file of an older version is brought up to it.

Rule: the tables are created or upgraded only by a writer, one transaction per version step
(`MIGRATIONS`), so a crash between steps leaves a consistent log of the intermediate version; a
file of a newer version than this silofed knows is refused, never guessed at.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from coordinator.storage.roundlog_records import RoundLogUnavailable

SCHEMA_VERSION = 2
LOG_FILENAME = "rounds.sqlite"  # the round log's name inside the coordinator's state_dir
PHASE_SETS = ("invited", "U1", "U2", "U3", "U4", "U5", "finished")

SCHEMA = """
CREATE TABLE rounds (
    round_id          INTEGER PRIMARY KEY CHECK (round_id >= 1),
    status            TEXT NOT NULL
                      CHECK (status IN ('running', 'completed', 'aborted', 'interrupted')),
    started_at        REAL NOT NULL,
    ended_at          REAL,
    aggregation       TEXT NOT NULL,
    config_digest     TEXT NOT NULL,
    model_in_sha256   TEXT NOT NULL,
    model_out_sha256  TEXT,
    rollback_of       INTEGER,
    weight_sum        REAL,
    global_metrics    TEXT NOT NULL DEFAULT '{}',
    abort_reason      TEXT,
    extra             TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE phases (
    round_id    INTEGER NOT NULL REFERENCES rounds(round_id),
    seq         INTEGER NOT NULL,
    phase       TEXT NOT NULL,
    started_at  REAL NOT NULL,
    ended_at    REAL NOT NULL,
    PRIMARY KEY (round_id, seq)
);
CREATE TABLE participants (
    round_id   INTEGER NOT NULL REFERENCES rounds(round_id),
    phase_set  TEXT NOT NULL
               CHECK (phase_set IN ('invited', 'U1', 'U2', 'U3', 'U4', 'U5', 'finished')),
    silo_id    TEXT NOT NULL,
    PRIMARY KEY (round_id, phase_set, silo_id)
);
CREATE TABLE dropouts (
    round_id  INTEGER NOT NULL REFERENCES rounds(round_id),
    silo_id   TEXT NOT NULL,
    phase     TEXT NOT NULL,
    reason    TEXT NOT NULL,
    PRIMARY KEY (round_id, silo_id)
);
CREATE TABLE silo_stats (
    round_id   INTEGER NOT NULL REFERENCES rounds(round_id),
    silo_id    TEXT NOT NULL,
    bytes_in   INTEGER NOT NULL CHECK (bytes_in >= 0),
    bytes_out  INTEGER NOT NULL CHECK (bytes_out >= 0),
    metrics    TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (round_id, silo_id)
);
CREATE TABLE privacy (
    round_id          INTEGER PRIMARY KEY REFERENCES rounds(round_id),
    mechanism         TEXT NOT NULL,
    noise_multiplier  REAL NOT NULL,
    clip_norm         REAL NOT NULL,
    epsilon           REAL NOT NULL,
    delta             REAL NOT NULL,
    details           TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE checkpoints (
    round_id  INTEGER PRIMARY KEY CHECK (round_id >= 0),
    path      TEXT NOT NULL,
    sha256    TEXT NOT NULL
);
"""

# Schema version 2: the final evaluation of the federation's last model (one row per evaluated
# round's model; it is not a round, so no other table refers to it).
FINAL_EVALUATIONS = """
CREATE TABLE final_evaluations (
    round_id        INTEGER PRIMARY KEY REFERENCES rounds(round_id),
    model_sha256    TEXT NOT NULL,
    started_at      REAL NOT NULL,
    ended_at        REAL NOT NULL,
    asked           TEXT NOT NULL DEFAULT '[]',
    answered        TEXT NOT NULL DEFAULT '[]',
    refusals        TEXT NOT NULL DEFAULT '{}',
    silo_metrics    TEXT NOT NULL DEFAULT '{}',
    global_metrics  TEXT NOT NULL DEFAULT '{}'
)
"""
# Statements that bring a log of version N to N + 1, run in one transaction per step.
MIGRATIONS: Mapping[int, tuple[str, ...]] = {1: (FINAL_EVALUATIONS,)}


def check_version(path: Path, version: int) -> None:
    """RoundLogUnavailable unless `version` is a schema version this silofed reads."""
    if version == 0:
        raise RoundLogUnavailable(
            f"{path} is not a silofed round log (no schema); point --log at "
            "<state_dir>/rounds.sqlite"
        )
    if version > SCHEMA_VERSION:
        raise RoundLogUnavailable(
            f"{path} has round-log schema version {version}, newer than this silofed "
            f"understands ({SCHEMA_VERSION}); upgrade silofed to read it"
        )


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Create the schema in a new file, or upgrade an older one (the caller holds its lock)."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == 0:
        has_tables = conn.execute(
            "SELECT count(*) FROM sqlite_master WHERE type='table'"
        ).fetchone()[0]
        if has_tables:
            raise RoundLogUnavailable(
                f"{path} is an SQLite database but not a silofed round log; "
                "choose another state_dir"
            )
        with _transaction(conn):
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(FINAL_EVALUATIONS)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    else:
        check_version(path, version)
        _upgrade(conn, version)


def _upgrade(conn: sqlite3.Connection, version: int) -> None:
    """Bring a log written by an older silofed to SCHEMA_VERSION, one step per transaction
    (a crash between steps leaves a consistent log of the intermediate version)."""
    while version < SCHEMA_VERSION:
        with _transaction(conn):
            # Re-read under the write lock: another writer may have upgraded it meanwhile.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version >= SCHEMA_VERSION:
                break
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={version + 1}")
        version += 1


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One schema step as a write transaction: committed when the block ends (also by `break`),
    rolled back on any exception, a failed COMMIT included."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
