"""coordinator.transport.admission: one stream per identity, bounded pending and open streams."""

from __future__ import annotations

import threading

import pytest

from coordinator.transport.admission import Busy, StreamTable


def test_a_new_stream_replaces_the_identitys_pending_one() -> None:
    table: StreamTable[str] = StreamTable(max_pending=2, capacity=4)
    first, replaced = table.open("a")
    assert replaced is None and table.counts() == (1, 1)
    second, replaced = table.open("a")
    assert replaced is None  # the first was not admitted: no session to end
    assert first.replaced and first.wake.is_set() and not second.replaced
    assert table.counts() == (1, 1)
    assert table.admit(first, lambda: "never") is None  # a replaced stream is not admitted
    table.close(first)  # forgotten when replaced: closing it changes nothing
    assert table.counts() == (1, 1)
    assert table.admit(second, lambda: "session-2") == "session-2"
    assert table.counts() == (0, 1)
    table.close(second)
    assert table.counts() == (0, 0)


def test_replacing_an_admitted_stream_hands_back_its_session() -> None:
    table: StreamTable[str] = StreamTable(max_pending=1, capacity=2)
    old, _ = table.open("a")
    table.admit(old, lambda: "old-session")
    new, replaced = table.open("a")
    assert replaced == "old-session" and old.replaced
    assert table.counts() == (1, 1)
    table.close(old)
    assert table.counts() == (1, 1)
    table.close(new)
    assert table.counts() == (0, 0)


def test_pending_and_open_streams_are_bounded() -> None:
    table: StreamTable[str] = StreamTable(max_pending=2, capacity=3)
    a, _ = table.open("a")
    table.open("b")
    with pytest.raises(Busy, match="max_pending_streams"):
        table.open("c")
    assert table.counts() == (2, 2)  # the refused stream holds nothing
    table.open("b")  # replacing a pending stream is no extra pending one
    table.admit(a, lambda: "a")
    c, _ = table.open("c")
    table.admit(c, lambda: "c")
    with pytest.raises(Busy, match="at most 3 streams"):
        table.open("d")
    assert table.counts() == (1, 3)
    table.open("a")  # an identity that holds a stream may always replace it
    assert table.counts() == (2, 3)


def test_a_failed_admission_leaves_the_stream_pending_until_closed() -> None:
    table: StreamTable[str] = StreamTable(max_pending=1, capacity=1)
    stream, _ = table.open("a")

    def refuse() -> str:
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        table.admit(stream, refuse)
    assert table.counts() == (1, 1)
    table.close(stream)
    assert table.counts() == (0, 0)


def test_a_replacement_during_admission_waits_for_it() -> None:
    """`open` for an identity whose stream is being admitted waits, then hands back the new
    session: the stale stream never ends up admitted after its replacement."""
    table: StreamTable[str] = StreamTable(max_pending=2, capacity=2)
    stream, _ = table.open("a")
    inside, release = threading.Event(), threading.Event()
    replaced: list[str | None] = []

    def slow_admit() -> str:
        inside.set()
        assert release.wait(10)
        return "first-session"

    admitting = threading.Thread(target=lambda: table.admit(stream, slow_admit))
    admitting.start()
    assert inside.wait(10)
    opener = threading.Thread(target=lambda: replaced.append(table.open("a")[1]))
    opener.start()
    opener.join(0.2)
    assert opener.is_alive()  # blocked on the identity's lock while it is admitted
    release.set()
    admitting.join(10)
    opener.join(10)
    assert replaced == ["first-session"] and stream.replaced
    assert table.counts() == (1, 1)
