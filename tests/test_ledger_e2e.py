"""Each silo's ledger lists exactly what the coordinator received from it (issue 8, acceptance 3).

A secure federation of four silo agents (real processes, mTLS on loopback) and a coordinator in
this process whose servicer hook records every message each silo's stream delivered. Round 1:
silo d freezes right after sending its key shares (`[debug] pause_after_phase = "share_keys"`),
so it is in U2 but cut from U3; the others release its s-shares at unmasking. Round 2: d is
still frozen and c freezes after advertising, so only a and b send their key shares and the
round aborts below the threshold — after every silo that trained sent its TrainReport.

Then, per silo, the ledger must equal what the hook received: message kind, round id, byte
count and SHA-256, in order, nothing more, nothing less; the share releases must name the right
silos (checked against the indices in the payload the coordinator received); and `silofed-silo
ledger verify` against `silofed-coordinator rounds export` must pass for every silo.

Why a queued message that never left cannot be listed: the Link reports an item from the code
after its `yield`, which gRPC only resumes once that item's send operation completed (and never
after the call failed). The comparison runs while every stream is still open, so nothing is in
flight when the two sides are read, and the wire recording is the independent side.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from coordinator.runtime import driver
from coordinator.runtime.hub import Hub
from protos import federation_pb2 as pb
from secagg.messages import SignedEnvelope, UnmaskShares, decode_as, decode_message
from silo_agent.storage.ledger_verify import LedgerError, read_ledger
from tests.federation_helpers import (
    RECORDING_SPEC,
    REPO,
    child_env,
    coordinator_in_process,
    processes,
    provision,
    run_module,
    write_coordinator_config,
    write_recording_silo_config,
)

pytestmark = pytest.mark.e2e

NAMES = ("a", "b", "c", "d")
FED = "ledg"
# n = 4 with one assumed colluder: threshold 3, so losing d still completes round 1 and losing
# c and d (U2 = {a, b}) aborts round 2.
SECAGG = {"clip_l2": 100.0, "threshold": 3, "n_colluders": 1, "weight_max": 40}
PAUSES = {"c": ("advertise", 2), "d": ("share_keys", 1)}

Record = tuple[int, str, int, str]  # round id, message, bytes, sha256 hex


def _id(name: str) -> str:
    return f"spiffe://{FED}/silo/{name}"


def _secagg_name(payload: bytes) -> str:
    message = decode_message(payload)
    if isinstance(message, SignedEnvelope):
        message = decode_message(message.payload)
    return type(message).__name__


def _wire(messages: Sequence[pb.SiloMessage]) -> list[Record]:
    """What the coordinator received, in the ledger's terms (worked out here independently)."""
    out: list[Record] = []
    header: pb.BlobHeader | None = None
    chunks: list[bytes] = []
    for m in messages:
        kind = m.WhichOneof("kind")
        if kind == "blob_header":
            header, chunks = m.blob_header, []
        elif kind == "blob_chunk":
            assert header is not None
            chunks.append(m.blob_chunk.data)
            if len(chunks) == header.chunk_count:  # only a whole blob counts as received
                data = b"".join(chunks)
                assert hashlib.sha256(data).digest() == header.sha256
                name = f"Blob({pb.BlobKind.Name(header.kind)})"
                out.append((header.round_id, name, len(data), header.sha256.hex()))
                header = None
        elif kind == "secagg":
            payload = m.secagg.payload
            name = f"SecAggFrame({_secagg_name(payload)})"
            out.append((m.secagg.round_id, name, len(payload), hashlib.sha256(payload).hexdigest()))
        elif kind in ("train_report", "abort"):
            inner = m.train_report if kind == "train_report" else m.abort
            raw = inner.SerializeToString(deterministic=True)
            name = "TrainReport" if kind == "train_report" else "AbortNotice"
            out.append((inner.round_id, name, len(raw), hashlib.sha256(raw).hexdigest()))
    return out


def _ledger(path: Path) -> list[Record] | None:
    try:
        return [(e.round_id, e.message, e.size, e.sha256) for e in read_ledger(path)]
    except LedgerError:  # not written yet, or a line being appended right now
        return None


def test_ledgers_list_exactly_what_the_coordinator_received(tmp_path: Path) -> None:
    started = time.monotonic()
    fed = provision(tmp_path / "fed", FED, NAMES)
    state = tmp_path / "coord"
    cfg_path = write_coordinator_config(
        tmp_path / "c.toml",
        fed,
        state_dir=state,
        task_spec=RECORDING_SPEC,
        rounds=2,
        min_silos=4,
        aggregation="secagg",
        secagg=SECAGG,
        # Short phases (round 2 waits offer_s for the frozen d, share_keys_s for the frozen c),
        # with room for four live silos answering on a loaded machine.
        offer_s=4.0,
        train_s=6.0,
        deadlines={"share_keys_s": 3.0, "consistency_s": 6.0, "unmask_s": 6.0},
    )
    received: dict[str, list[pb.SiloMessage]] = {_id(n): [] for n in NAMES}
    lock = threading.Lock()

    def record(silo_id: str, message: pb.SiloMessage) -> None:
        with lock:
            received[silo_id].append(message)

    def drive(hub: Hub) -> None:
        if hub.wait_for_silos(len(NAMES), 60):
            driver.run_one_round(hub, 0)  # d cut from U3
            driver.run_one_round(hub, hub.completed_rounds())  # aborted

    states = {n: fed.silos[n].dir / "state" for n in NAMES}
    configs: dict[str, Path] = {}
    with (
        coordinator_in_process(cfg_path, on_receive=record) as coordinator,
        processes(tmp_path / "logs") as procs,
    ):
        for i, name in enumerate(NAMES):
            point, in_round = PAUSES.get(name, (None, None))
            configs[name] = write_recording_silo_config(
                tmp_path / f"{name}.toml",
                fed,
                name,
                port=coordinator.port,
                num_examples=10 + i,
                record_root=tmp_path / "sent",
                state_dir=states[name],
                allow_plaintext_insecure=False,
                pause_after_phase=point,
                pause_in_round=in_round,
            )
            procs.silo(name, configs[name])
        rounds_run = coordinator.drive(drive)
        assert rounds_run.wait(90), procs.logs()
        # The frozen silos' own deadline logic may still send an AbortNotice: compare once
        # both sides agree, bounded; a message on one side only never lets them agree.
        deadline = time.monotonic() + 20
        while True:
            with lock:
                wire = {n: _wire(received[_id(n)]) for n in NAMES}
            ledgers = {n: _ledger(states[n] / "ledger.jsonl") for n in NAMES}
            if ledgers == wire or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for name in NAMES:
            assert ledgers[name] == wire[name], (name, ledgers[name], wire[name])
        sessions_recorded = {n: list(received[_id(n)]) for n in NAMES}
        for proc in procs.procs:  # all at once; leaving the block waits for each by pid
            proc.popen.send_signal(signal.SIGTERM)

    export = tmp_path / "export.json"
    done = run_module(
        "coordinator", "rounds", "export", "--state-dir", str(state), "--format", "json",
        "--output", str(export), timeout_s=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rounds = {r["round"]: r for r in json.loads(export.read_text())["rounds"]}
    assert [rounds[1]["status"], rounds[2]["status"]] == ["completed", "aborted"], rounds
    sets = rounds[1]["participants"]
    assert _id("d") in sets["U2"] and _id("d") not in sets["U3"]
    assert sorted(sets["U3"]) == [_id(n) for n in ("a", "b", "c")]
    assert "THRESHOLD_VIOLATION" in (rounds[2]["abort_reason"] or "")

    entries = {n: read_ledger(states[n] / "ledger.jsonl") for n in NAMES}
    # Cut from U3: d lists what it sent in round 1 and nothing of the phases it never reached.
    d_round1 = {e.message for e in entries["d"] if e.round_id == 1}
    assert {"SecAggFrame(Advertise)", "SecAggFrame(ShareKeys)", "TrainReport"} <= d_round1
    assert not d_round1 & {
        "SecAggFrame(MaskedHeader)",
        "Blob(MASKED_VECTOR)",
        "SecAggFrame(Consistency)",
        "SecAggFrame(UnmaskShares)",
    }
    # The aborted round's TrainReports are listed (evaluation metrics did leave the site).
    for name in ("a", "b", "c"):
        assert "TrainReport" in {e.message for e in entries[name] if e.round_id == 2}, name
    # Share releases name the right silos: the ids in the ledger are the indices of the payload
    # the coordinator received, mapped through U1 in key-list order (sorted by silo id).
    u1 = sorted(sets["U1"])
    for name in ("a", "b", "c"):
        (release,) = [e for e in entries[name] if e.message == "SecAggFrame(UnmaskShares)"]
        (payload,) = [
            m.secagg.payload
            for m in sessions_recorded[name]
            if m.WhichOneof("kind") == "secagg" and _secagg_name(m.secagg.payload) == "UnmaskShares"
        ]
        sent = decode_as(payload, UnmaskShares)
        assert release.details["b_shares_for"] == [u1[i - 1] for i, _ in sent.b_shares]
        assert release.details["s_shares_for"] == [u1[i - 1] for i, _ in sent.s_shares]
        assert sorted(release.details["b_shares_for"]) == sorted(sets["U3"])
        assert release.details["s_shares_for"] == [_id("d")]

    checks = [
        subprocess.Popen(
            [sys.executable, "-m", "silo_agent", "ledger", "verify", "--config",
             str(configs[n]), "--export", str(export)],
            cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )
        for n in NAMES
    ]  # fmt: skip
    for name, check in zip(NAMES, checks, strict=True):
        out, _ = check.communicate(timeout=60)
        assert check.returncode == 0, (name, out)
        assert f"of {_id(name)} agree" in out
    print(f"ledger e2e: {time.monotonic() - started:.1f} s")
