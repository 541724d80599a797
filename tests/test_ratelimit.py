"""coordinator.observability.ratelimit: one line per (cause, peer) per interval, with the count of
what it
stands for; an injected clock makes the intervals exact (issue 10, "rate-limited logging")."""

from __future__ import annotations

import logging

import pytest

from coordinator.observability.ratelimit import OTHER_PEERS, PeerLog, exception_line


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelno, record.getMessage()))


def recorded(interval_s: float = 10.0, burst: int = 1) -> tuple[PeerLog, Clock, Lines]:
    """A PeerLog on a fresh logger whose lines are kept, and its clock."""
    logger = logging.getLogger("test.ratelimit")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    lines = Lines()
    logger.addHandler(lines)
    clock = Clock()
    return PeerLog(logger, interval_s=interval_s, clock=clock, burst=burst), clock, lines


@pytest.fixture()
def setup() -> tuple[PeerLog, Clock, Lines]:
    return recorded()


def test_twenty_thousand_repeats_make_two_lines_with_the_count(
    setup: tuple[PeerLog, Clock, Lines],
) -> None:
    plog, clock, lines = setup
    written = 0
    for i in range(20_000):
        clock.t = 1000.0 + i * 0.0004  # 20,000 frames in 8 s
        written += plog.info("stray frame", "silo-x", "ignoring a frame from %s", "silo-x")
    assert written == 1
    assert lines.lines == [(logging.INFO, "ignoring a frame from silo-x")]
    clock.t = 1010.5
    assert plog.info("stray frame", "silo-x", "ignoring a frame from %s", "silo-x")
    assert lines.lines[-1] == (
        logging.INFO,
        "ignoring a frame from silo-x (and 19,999 more like it in the last 10 s)",
    )


def test_causes_and_peers_are_limited_separately(setup: tuple[PeerLog, Clock, Lines]) -> None:
    plog, _, lines = setup
    for _ in range(5):
        plog.warning("bad chunk", "a", "a: bad chunk")
        plog.warning("bad chunk", "b", "b: bad chunk")
        plog.warning("stray report", "a", "a: stray report")
    assert [m for _, m in lines.lines] == ["a: bad chunk", "b: bad chunk", "a: stray report"]


def test_a_count_no_later_line_carries_is_flushed(setup: tuple[PeerLog, Clock, Lines]) -> None:
    plog, clock, lines = setup
    for _ in range(4):
        plog.warning("bad chunk", "a", "a: bad chunk")
    clock.t += 5
    assert plog.flush() == 0  # the interval is not over
    clock.t += 6
    assert plog.flush() == 1
    assert lines.lines[-1] == (logging.WARNING, "a: 3 more like it (bad chunk) in the last 11 s")
    clock.t += 2
    assert plog.flush() == 0  # written once; the key is forgotten
    assert plog.warning("bad chunk", "a", "a: bad chunk again")  # and logs at once
    assert lines.lines[-1] == (logging.WARNING, "a: bad chunk again")


def test_quiet_keys_are_forgotten_and_the_table_is_bounded() -> None:
    logger = logging.getLogger("test.ratelimit.bounded")
    logger.propagate = False
    lines = Lines()
    logger.addHandler(lines)
    clock = Clock()
    plog = PeerLog(logger, interval_s=10.0, clock=clock, max_keys=3)
    for i in range(100):
        plog.warning("refused", f"peer{i}", "refused %s", f"peer{i}")
    # 3 peers of their own, then one shared entry for everyone else
    assert [m for _, m in lines.lines] == ["refused peer0", "refused peer1", "refused peer2"] + [
        "refused peer3"
    ]
    assert len(plog._windows) == 4
    assert ("refused", OTHER_PEERS) in plog._windows
    clock.t += 11
    plog.flush()
    assert plog._windows == {}
    assert lines.lines[-1][1] == f"{OTHER_PEERS}: 96 more like it (refused) in the last 11 s"


def test_arguments_are_clipped_to_one_printable_line(
    setup: tuple[PeerLog, Clock, Lines],
) -> None:
    plog, _, lines = setup
    plog.warning("abort", "a", "%s aborted: %s", "a", "x\n" * 2_000_000)
    (_, line) = lines.lines[-1]
    assert "\n" not in line
    assert len(line) < 700
    assert line.endswith("…(+3,999,488 chars)")


def test_exception_line_is_bounded() -> None:
    try:
        raise ValueError("n" * 3_900_000)
    except ValueError as exc:
        line = exception_line(exc)
    assert line.startswith("ValueError: nnn")
    assert "at test_ratelimit.py:" in line and "in test_exception_line_is_bounded" in line
    assert len(line) < 700


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="interval_s > 0"):
        PeerLog(logging.getLogger("x"), interval_s=0)


def test_a_burst_writes_that_many_lines_per_interval_then_counts() -> None:
    plog, clock, lines = recorded(interval_s=60.0, burst=3)
    written = [plog.info("connected", "a", "a connected %d", i) for i in range(10)]
    assert written == [True] * 3 + [False] * 7
    assert plog.info("connected", "b", "b connected")  # another peer has its own burst
    clock.t += 60.0
    assert plog.info("connected", "a", "a connected %d", 10)
    assert lines.lines[-1][1] == "a connected 10 (and 7 more like it in the last 60 s)"
    with pytest.raises(ValueError, match="burst >= 1"):
        PeerLog(plog.logger, burst=0)
