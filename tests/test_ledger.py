"""The silo's ledger: what `SentLedger` records, how it reads back, and `ledger verify`.

Unit tests feed `SentLedger` real messages: the encoded secagg messages of an in-memory round
(tests/secagg/harness.py, one silo cut from U3) and real protobuf messages. Two tests run the
Link over real gRPC with mTLS on loopback: one against a coordinator stand-in that stops reading
(a blob that cannot leave is never recorded; once it reads again, everything is, in order).
The e2e tests (marked) run a real two-round plaintext federation (coordinator and silo
processes) and every ledger command through `python -m silo_agent ...`; hand edits to the
export (and to a ledger) must make `verify` fail naming the round and the field.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from protos import federation_pb2 as pb
from protos import federation_pb2_grpc as pb_grpc
from protos.names import aggregation_name
from secagg.errors import AbortReason
from secagg.messages import AbortNotice, MaskedHeader, encode_message
from silo_agent.config import load_silo_config
from silo_agent.storage.ledger import FINAL_EVALUATION, SentLedger, record_roster_adopted
from silo_agent.storage.ledger_verify import LedgerEntry, LedgerError, by_round, read_ledger, verify
from silo_agent.transport.connection import Link, OutBlob
from tests.federation_helpers import (
    RECORDING_SPEC,
    holds_within,
    processes,
    provision,
    run_module,
    serve_scripted,
    wait_for_port,
    write_coordinator_config,
    write_recording_silo_config,
)
from tests.secagg.harness import Round, exact_inputs, make_config
from tests.secagg.pki import federation

e2e = pytest.mark.e2e
MODEL_IN = "ab" * 32


def _frame(round_id: int, payload: bytes) -> pb.SiloMessage:
    return pb.SiloMessage(secagg=pb.SecAggFrame(round_id=round_id, payload=payload))


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


# ---- SentLedger on real secagg messages ----------------------------------------------------


def test_a_secure_round_is_recorded_message_by_message_with_share_recipients(
    tmp_path: Path,
) -> None:
    fed = federation()
    cfg = make_config(fed, 4, 40)
    victim = cfg.invited[3]
    r = Round(fed, cfg, exact_inputs(cfg, np.random.default_rng(1)), drop_at={victim: "masked"})
    rnd = r.run()
    u2, u3 = set(rnd.participants["U2"]), set(rnd.participants["U3"])
    assert victim in u2 - u3  # the scenario: cut from U3 after sharing its keys
    silo = cfg.invited[0]
    session = r.sessions[silo]
    ledger = SentLedger(tmp_path / "ledger.jsonl", FakeClock())
    ledger.note_round(cfg.round_id, "secagg", bytes.fromhex(MODEL_IN))
    sent = r.sent[silo]
    ledger.on_sent(_frame(cfg.round_id, sent[0]))  # Advertise: no index map yet
    ledger.note_indices(cfg.round_id, {i: p.silo_id for i, p in session.u1.items()})
    for payload in sent[1:]:
        ledger.on_sent(_frame(cfg.round_id, payload))

    lines = _lines(tmp_path / "ledger.jsonl")
    assert [line["message"] for line in lines] == [
        "SecAggFrame(Advertise)",
        "SecAggFrame(ShareKeys)",
        "SecAggFrame(Consistency)",
        "SecAggFrame(UnmaskShares)",
    ]
    for line, payload in zip(lines, sent, strict=True):
        assert line["bytes"] == len(payload)
        assert line["sha256"] == hashlib.sha256(payload).hexdigest()
        assert line["round_id"] == cfg.round_id and line["format"] == 2
        assert line["aggregation"] == "secagg" and line["model_in_sha256"] == MODEL_IN
    advertise, share_keys, consistency, unmask = lines
    assert advertise["signed"] and advertise["signed_round_id"] == cfg.round_id
    assert advertise["advertised_silo_id"] == silo
    assert consistency["signed"] and "signed" not in unmask
    others = sorted(set(cfg.invited) - {silo})
    assert sorted(share_keys["encrypted_shares_for"]) == others
    # The shares released at unmasking, named by silo: b for U3 (itself included), s for the
    # silo that shared its keys and then dropped out.
    assert sorted(unmask["b_shares_for"]) == sorted(u3)
    assert unmask["s_shares_for"] == [victim]
    assert by_round(read_ledger(tmp_path / "ledger.jsonl"))[0].share_releases() == {
        "b_shares_for": unmask["b_shares_for"],
        "s_shares_for": [victim],
    }

    # The victim sent its key advertisement and its shares, and nothing after.
    cut = SentLedger(tmp_path / "victim.jsonl", FakeClock())
    for payload in r.sent[victim]:
        cut.on_sent(_frame(cfg.round_id, payload))
    assert [line["message"] for line in _lines(tmp_path / "victim.jsonl")] == [
        "SecAggFrame(Advertise)",
        "SecAggFrame(ShareKeys)",
    ]
    # Without the index map, share recipients are recorded by their secagg index.
    assert all(
        isinstance(v, int) for v in _lines(tmp_path / "victim.jsonl")[1]["encrypted_shares_for"]
    )


def test_masked_header_abort_and_undecodable_frames(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger = SentLedger(path, FakeClock())
    header = encode_message(MaskedHeader(b"\1" * 32, 2, 1000, 32, b"\2" * 32, 7, 1 << 16, True))
    abort = encode_message(AbortNotice(b"\3" * 32, AbortReason.TIMEOUT))
    garbage = b"not a secagg message"
    truncated = abort[:-1]
    for payload in (header, abort, garbage, truncated):
        ledger.on_sent(_frame(5, payload))
    lines = _lines(path)
    assert [line["message"] for line in lines] == [
        "SecAggFrame(MaskedHeader)",
        "SecAggFrame(AbortNotice)",
        "SecAggFrame(undecodable)",
        "SecAggFrame(undecodable)",
    ]
    assert lines[0]["index"] == 2 and lines[0]["vector_sha256"] == "02" * 32
    assert lines[1]["reason"] == "TIMEOUT"
    assert lines[2]["bytes"] == len(garbage)
    assert lines[2]["sha256"] == hashlib.sha256(garbage).hexdigest()
    assert lines[3]["bytes"] == len(truncated)
    # A round whose offer was never noted: nothing to say about its aggregation or model.
    assert lines[0]["aggregation"] is None and lines[0]["model_in_sha256"] is None


# ---- SentLedger on protobuf messages and blobs ---------------------------------------------


def test_a_masked_vector_is_one_line_with_its_signed_header(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger = SentLedger(path, FakeClock())
    ledger.note_round(6, "secagg", "00" * 32)
    header = encode_message(MaskedHeader(b"\1" * 32, 2, 2, 32, b"\2" * 32, 7, 1 << 16, True))
    vector = memoryview(b"\5" * 8)
    ledger.on_sent(OutBlob(6, pb.MASKED_VECTOR, vector, b"\x09" * 32, header))
    (line,) = _lines(path)
    assert (line["message"], line["bytes"], line["sha256"]) == ("Blob(MASKED_VECTOR)", 8, "09" * 32)
    shown = line["protocol_header"]
    assert shown["message"] == "MaskedHeader" and shown["index"] == 2
    assert shown["vector_sha256"] == "02" * 32 and shown["length"] == 2
    assert (shown["weight_element"], shown["weight_scale"], shown["uniform_weighting"]) == (
        7,
        1 << 16,
        True,
    )
    assert shown["bytes"] == len(header) and shown["sha256"] == hashlib.sha256(header).hexdigest()


def test_reports_aborts_and_blobs_but_not_hello_or_heartbeat(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger = SentLedger(path, FakeClock())
    ledger.note_round(3, "plaintext-insecure", MODEL_IN)
    report = pb.TrainReport(
        round_id=3,
        num_examples=12,
        metrics={"train_loss": 0.5, "eval_accuracy": 0.75, "eval_auc": 0.8},
        update_sha256=b"\7" * 32,
    )
    metrics_only = pb.TrainReport(round_id=4, metrics={"eval_loss": 1.0})
    notice = pb.AbortNotice(round_id=4, code=pb.ABORT_REASON_DECLINED, detail="no plaintext here")
    update = bytes(range(256)) * 10_000  # 2.5 MB: three chunks of at most 1 MiB
    ledger.on_sent(pb.SiloMessage(hello=pb.Hello(silo_id="spiffe://x/silo/a")))
    ledger.on_sent(pb.SiloMessage(train_report=report))
    ledger.on_sent(OutBlob(3, pb.PLAINTEXT_UPDATE, update))  # no digest given: hashed here
    ledger.on_sent(OutBlob(4, pb.MASKED_VECTOR, memoryview(b"\0" * 8), b"\x09" * 32))
    ledger.on_sent(pb.SiloMessage(train_report=metrics_only))
    ledger.on_sent(pb.SiloMessage(abort=notice))

    lines = _lines(path)
    assert [(line["round_id"], line["message"]) for line in lines] == [
        (3, "TrainReport"),
        (3, "Blob(PLAINTEXT_UPDATE)"),
        (4, "Blob(MASKED_VECTOR)"),
        (4, "TrainReport"),
        (4, "AbortNotice"),
    ]
    first, blob, masked, second, abort = lines
    # A receiver that parses and re-serializes the report gets the recorded digest.
    raw = pb.TrainReport.FromString(report.SerializeToString()).SerializeToString(
        deterministic=True
    )
    assert first["sha256"] == hashlib.sha256(raw).hexdigest() and first["bytes"] == len(raw)
    assert first["metrics"] == ["eval_accuracy", "eval_auc", "train_loss"]
    assert first["num_examples"] == 12 and first["update_sha256"] == "07" * 32
    assert first["aggregation"] == "plaintext-insecure" and first["model_in_sha256"] == MODEL_IN
    assert blob["bytes"] == len(update) and blob["chunks"] == 3
    assert blob["sha256"] == hashlib.sha256(update).hexdigest()
    assert masked["sha256"] == "09" * 32 and masked["bytes"] == 8 and masked["chunks"] == 1
    assert second["update_sha256"] is None and second["aggregation"] is None
    assert abort["reason"] == "DECLINED" and abort["detail"] == "no plaintext here"
    assert [e.message for e in read_ledger(path)] == [line["message"] for line in lines]
    assert [e.at for e in read_ledger(path)] == [1001.0, 1002.0, 1003.0, 1004.0, 1005.0]


def test_recording_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    ledger = SentLedger(blocked / "ledger.jsonl", FakeClock())  # its folder is a file
    ledger.on_sent(pb.SiloMessage(train_report=pb.TrainReport(round_id=1)))
    assert "could not record a sent message" in caplog.text
    ledger.on_sent("not a message")  # type: ignore[arg-type]


# ---- reading old and damaged ledgers -------------------------------------------------------


def test_a_format_1_line_reads_as_its_upload(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    old = {
        "round_id": 2,
        "at": 5.0,
        "aggregation": "secagg",
        "model_in_sha256": MODEL_IN,
        "update_sha256": "cd" * 32,
        "update_bytes": 2124,
        "num_examples": 9,
        "messages": ["SecAggFrame(Advertise)"],
    }
    path.write_text(json.dumps(old) + "\n")
    (entry,) = read_ledger(path)
    assert (entry.message, entry.size, entry.sha256, entry.format) == (
        "Blob(MASKED_VECTOR)",
        2124,
        "cd" * 32,
        1,
    )
    (record,) = by_round([entry])
    assert not record.complete and record.update == entry


def test_a_torn_line_is_reported_with_its_number(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"round_id": 1}\n')
    with pytest.raises(LedgerError, match=r"ledger.jsonl:1: field 'aggregation'"):
        read_ledger(path)
    path.write_text('{"format": 2, "round_id": 1, "at": 1, "message": "TrainReport"}\n')
    with pytest.raises(LedgerError, match=r"ledger.jsonl:1: field 'bytes'"):
        read_ledger(path)
    path.write_text('{"format": 9}\n')
    with pytest.raises(LedgerError, match=r"ledger.jsonl:1: ledger format 9 is not known"):
        read_ledger(path)
    path.write_text('{"round_id": 1, "at"\n')
    with pytest.raises(LedgerError, match=r"ledger.jsonl:1: not valid JSON"):
        read_ledger(path)


def test_a_line_after_a_torn_one_starts_on_its_own_line(tmp_path: Path) -> None:
    """A crash can leave the last line half-written; the agent's next line must not be glued to
    it, or one torn line would ruin two."""
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(b'{"format": 2, "round_id": 1, "at"')  # torn, no newline
    ledger = SentLedger(path, FakeClock())
    ledger.note_round(2, "secagg", "00" * 32)
    report = pb.TrainReport(round_id=2, metrics={"eval_x": 1.0})
    ledger.on_sent(pb.SiloMessage(train_report=report))
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and lines[0] == '{"format": 2, "round_id": 1, "at"'
    assert json.loads(lines[1])["message"] == "TrainReport"
    with pytest.raises(LedgerError, match=r"ledger.jsonl:1: not valid JSON"):
        read_ledger(path)  # the torn line is named; the one after it is intact


# ---- verify on a hand-made export ----------------------------------------------------------

SILO = "spiffe://v/silo/a"


def _entry(round_id: int, message: str, size: int = 10, **over: Any) -> LedgerEntry:
    fields: dict[str, Any] = {
        "aggregation": "secagg",
        "model_in_sha256": MODEL_IN,
        "sha256": "00" * 32,
        **over,
    }
    return LedgerEntry(round_id=round_id, at=1.0, message=message, size=size, **fields)


SECURE_ROUND = [
    _entry(1, "SecAggFrame(Advertise)"),
    _entry(1, "TrainReport"),
    _entry(1, "SecAggFrame(ShareKeys)"),
    _entry(1, "SecAggFrame(MaskedHeader)"),
    _entry(1, "Blob(MASKED_VECTOR)", 2000),
    _entry(1, "SecAggFrame(Consistency)"),
    _entry(1, "SecAggFrame(UnmaskShares)"),
]


def _export(**over: Any) -> dict[str, Any]:
    sets = {f"U{i}": [SILO] for i in range(1, 6)}
    doc: dict[str, Any] = {
        "round": 1,
        "aggregation": "secagg",
        "model_in_sha256": MODEL_IN,
        "participants": {"invited": [SILO], "finished": [SILO], **sets},
        "silos": [{"silo_id": SILO, "bytes_in": 2500}],
    }
    doc.update(over)
    return {"rounds": [doc]}


def test_verify_agrees_then_names_each_disagreement() -> None:
    assert verify(SECURE_ROUND, _export(), SILO) == []
    assert verify(SECURE_ROUND, _export(round=2), SILO)[0].field == "round"
    fields = {
        m.field for m in verify(SECURE_ROUND, _export(aggregation="plaintext-insecure"), SILO)
    }
    assert fields == {"aggregation"}
    stats = [{"silo_id": SILO, "bytes_in": 1999}]
    (short,) = verify(SECURE_ROUND, _export(silos=stats), SILO)
    assert (short.field, short.ledger, short.coordinator) == ("silos.bytes_in", 2000, 1999)
    # The coordinator counts messages this silo never sent.
    without = [e for e in SECURE_ROUND if e.message not in ("Blob(MASKED_VECTOR)",)]
    found = {m.field for m in verify(without, _export(), SILO)}
    assert found == {"participants.finished", "participants.U3"}
    no_shares = [e for e in SECURE_ROUND if e.message != "SecAggFrame(ShareKeys)"]
    (missing,) = verify(no_shares, _export(), SILO)
    assert missing.field == "participants.U2" and "ShareKeys" in missing.explanation
    # A silo cut from U3 sent only its first messages; that is no disagreement.
    early = SECURE_ROUND[:3]
    cut = {"invited": [SILO], "finished": [], "U1": [SILO], "U2": [SILO], "U3": []}
    assert verify(early, _export(participants=cut), SILO) == []
    # Format-1 rounds recorded only their upload: the participant sets are not checked.
    legacy = [_entry(1, "Blob(MASKED_VECTOR)", 2000, format=1)]
    assert verify(legacy, _export(), SILO) == []


def test_a_final_evaluation_is_checked_against_the_model_its_round_produced() -> None:
    # The runner records an offer's aggregation by this name: the final evaluation's is this.
    assert aggregation_name(pb.AGGREGATION_EVALUATE) == FINAL_EVALUATION
    answer = _entry(1, "TrainReport", aggregation=FINAL_EVALUATION, model_in_sha256="cd" * 32)
    assert verify([*SECURE_ROUND, answer], _export(model_out_sha256="cd" * 32), SILO) == []
    (wrong,) = verify([*SECURE_ROUND, answer], _export(model_out_sha256="ef" * 32), SILO)
    assert (wrong.field, wrong.ledger) == ("model_out_sha256", "cd" * 32)
    # Asked to evaluate a round it was not invited to (it connected later): no disagreement.
    late = _export(model_out_sha256="cd" * 32, participants={"invited": ["spiffe://v/silo/b"]})
    assert verify([answer], late, SILO) == []


def test_a_line_of_no_round_is_read_but_not_compared(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    roster = b'{"federation_id": "v", "version": 2}'
    record_roster_adopted(path, at=3.0, roster_json=roster, details={"new_version": 2})
    (adopted,) = read_ledger(path)
    assert (adopted.round_id, adopted.message, adopted.size) == (0, "RosterAdopted", len(roster))
    assert verify([*SECURE_ROUND, adopted], _export(), SILO) == []


# ---- the Link reports what gRPC took, and only that -----------------------------------------


class _HoldingServicer(pb_grpc.FederationServicer):
    """A coordinator stand-in: welcomes, then reads nothing until `release` is set."""

    stream_capacity = 4  # what start_server sizes its worker pool by

    def __init__(self) -> None:
        self.release = threading.Event()
        self.hang_up = threading.Event()
        self.received: list[pb.SiloMessage] = []
        self.done = threading.Event()

    def Connect(  # noqa: N802 - gRPC method name
        self, request_iterator: Iterator[pb.SiloMessage], context: grpc.ServicerContext
    ) -> Iterator[pb.CoordinatorMessage]:
        self.received.append(next(request_iterator))
        yield pb.CoordinatorMessage(welcome=pb.Welcome())
        self.release.wait(30)
        for message in request_iterator:
            self.received.append(message)
            if message.WhichOneof("kind") == "train_report":
                break
        self.done.set()
        # Keep the stream open: ending the call right after the last message would race the
        # client's report of it (see connection.py: a message whose stream ends as it leaves).
        self.hang_up.wait(30)


def test_a_message_that_cannot_leave_is_not_recorded(tmp_path: Path) -> None:
    fed = provision(tmp_path / "fed", "hold", ["a"])
    servicer = _HoldingServicer()
    running, tls = serve_scripted(servicer, fed, "a")
    path = tmp_path / "ledger.jsonl"
    ledger = SentLedger(path, FakeClock())
    seen: list[str] = []

    def on_sent(item: pb.SiloMessage | OutBlob) -> None:
        seen.append("blob" if isinstance(item, OutBlob) else str(item.WhichOneof("kind")))
        ledger.on_sent(item)

    link = Link(f"127.0.0.1:{running.port}", tls, server_name="localhost", on_sent=on_sent)
    try:
        replies = link.open(pb.Hello(silo_id="spiffe://hold/silo/a"))
        assert next(replies).WhichOneof("kind") == "welcome"
        assert holds_within(lambda: seen == ["hello"], 10), seen
        # 16 MiB cannot pass a stream whose reader stopped (HTTP/2 flow control holds it).
        update = np.random.default_rng(0).bytes(16 << 20)
        link.send(OutBlob(1, pb.PLAINTEXT_UPDATE, update))
        link.send(pb.SiloMessage(train_report=pb.TrainReport(round_id=1, num_examples=3)))
        assert not holds_within(lambda: len(seen) > 1, 2.0), seen
        assert not path.exists()  # Hello is never written; nothing else has left
        # The reader resumes: both leave, and are recorded, in the order they left.
        servicer.release.set()
        assert servicer.done.wait(20)
        assert holds_within(lambda: seen == ["hello", "blob", "train_report"], 10), seen
    finally:
        servicer.release.set()
        servicer.hang_up.set()
        link.close()
        running.stop()
    received = [m.WhichOneof("kind") for m in servicer.received]
    assert received == ["hello", "blob_header"] + ["blob_chunk"] * 16 + ["train_report"]
    blob, report = _lines(path)
    assert (blob["message"], blob["bytes"], blob["chunks"]) == (
        "Blob(PLAINTEXT_UPDATE)",
        16 << 20,
        16,
    )
    assert blob["sha256"] == hashlib.sha256(update).hexdigest()
    assert servicer.received[1].blob_header.sha256.hex() == blob["sha256"]
    assert report["message"] == "TrainReport" and report["num_examples"] == 3


# ---- e2e: a real plaintext federation ------------------------------------------------------


@dataclass(frozen=True)
class Run:
    root: Path
    state: Path
    silo_configs: dict[str, Path]
    export: Path


def cli(*args: str, module: str = "silo_agent") -> subprocess.CompletedProcess[str]:
    return run_module(module, *args)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("ledger")
    names = ("a", "b")
    fed = provision(root / "fed", "ledgerfed", names)
    state = root / "coord"
    cfg = write_coordinator_config(
        root / "coord.toml", fed, state_dir=state, task_spec=RECORDING_SPEC, rounds=2, min_silos=2
    )
    configs: dict[str, Path] = {}
    with processes(root / "logs") as procs:
        coordinator = procs.coordinator(cfg)
        port = wait_for_port(state, coordinator)
        silos = []
        for i, name in enumerate(names):
            configs[name] = write_recording_silo_config(
                root / f"{name}.toml", fed, name, port=port, num_examples=10 + i, record_root=root
            )
            silos.append(procs.silo(name, configs[name]))
        assert coordinator.wait(120) == 0, procs.logs()
        for silo in silos:
            assert silo.wait(30) == 0, procs.logs()
    export = root / "export.json"
    done = cli(
        "rounds", "export", "--state-dir", str(state), "--format", "json", "--output", str(export),
        module="coordinator",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return Run(root, state, configs, export)


@e2e
def test_ledger_shows_each_round(run: Run) -> None:
    done = cli("ledger", "--config", str(run.silo_configs["a"]), "--json")
    assert done.returncode == 0, done.stderr
    rounds = json.loads(done.stdout)
    export = json.loads(run.export.read_text())
    assert [r["round_id"] for r in rounds] == [r["round"] for r in export["rounds"]] == [1, 2]
    for record, round_doc in zip(rounds, export["rounds"], strict=True):
        # The model the silo says it received is the one the coordinator says it sent.
        assert record["model_in_sha256"] == round_doc["model_in_sha256"]
        report, blob = [m for m in record["messages"] if m["aggregation"] != FINAL_EVALUATION]
        assert (report["message"], blob["message"]) == ("TrainReport", "Blob(PLAINTEXT_UPDATE)")
        # The report names the update that followed it.
        assert report["update_sha256"] == blob["sha256"] == record["update"]["sha256"]
        assert record["update"]["bytes"] == blob["bytes"] > 0
    # The final evaluation's answer, under the last round's id, is of the model it produced.
    for answer in [m for m in rounds[-1]["messages"] if m["aggregation"] == FINAL_EVALUATION]:
        assert answer["message"] == "TrainReport" and answer["update_sha256"] is None
        assert answer["model_in_sha256"] == export["rounds"][-1]["model_out_sha256"]
    table = cli("ledger", "show", "--config", str(run.silo_configs["a"]))
    assert table.returncode == 0, table.stderr
    assert rounds[0]["update"]["sha256"][:16] in table.stdout
    assert "TrainReport, Blob(PLAINTEXT_UPDATE)" in table.stdout


@e2e
def test_verify_passes_on_the_real_logs(run: Run) -> None:
    for name, config in run.silo_configs.items():
        done = cli("ledger", "verify", "--config", str(config), "--export", str(run.export))
        assert done.returncode == 0, done.stdout + done.stderr
        assert "OK: 2 round(s), 2 upload(s)" in done.stdout and f"/silo/{name}" in done.stdout


@e2e
def test_verify_names_round_and_field_of_a_hand_edit(run: Run, tmp_path: Path) -> None:
    doc = json.loads(run.export.read_text())
    doc["rounds"][1]["model_in_sha256"] = "0" * 64
    for silo in doc["rounds"][0]["silos"]:
        silo["bytes_in"] = 10
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(doc))
    done = cli("ledger", "verify", "--config", str(run.silo_configs["b"]), "--export", str(edited))
    assert done.returncode == 1
    assert "round 2: model_in_sha256 differs" in done.stdout
    assert "round 1: silos.bytes_in differs" in done.stdout
    as_json = cli(
        "ledger", "verify", "--json", "--config", str(run.silo_configs["b"]),
        "--export", str(edited),
    )  # fmt: skip
    assert as_json.returncode == 1
    fields = {(m["round"], m["field"]) for m in json.loads(as_json.stdout)["mismatches"]}
    assert fields == {(2, "model_in_sha256"), (1, "silos.bytes_in")}


@e2e
def test_verify_names_an_upload_missing_from_the_ledger(run: Run, tmp_path: Path) -> None:
    source = load_silo_config(run.silo_configs["a"]).state_dir / "ledger.jsonl"
    lines = [line for line in source.read_text().splitlines() if json.loads(line)["round_id"] == 1]
    trimmed = tmp_path / "state"
    trimmed.mkdir()
    (trimmed / "ledger.jsonl").write_text("\n".join(lines) + "\n")
    export = json.loads(run.export.read_text())
    a_id = next(s for s in export["rounds"][0]["participants"]["finished"] if s.endswith("/a"))
    done = cli(
        "ledger", "verify", "--state-dir", str(trimmed), "--silo-id", a_id,
        "--export", str(run.export),
    )  # fmt: skip
    assert done.returncode == 1
    assert "round 2: participants.finished differs" in done.stdout


@e2e
def test_errors_say_what_to_do(run: Run, tmp_path: Path) -> None:
    missing = cli("ledger", "--state-dir", str(tmp_path))
    assert missing.returncode == 1 and "no ledger here" in missing.stderr
    no_export = cli(
        "ledger", "verify", "--config", str(run.silo_configs["a"]),
        "--export", str(tmp_path / "nope.json"),
    )  # fmt: skip
    assert no_export.returncode == 1 and "rounds export" in no_export.stderr
    nothing = cli("ledger")
    assert nothing.returncode == 1 and "--config" in nothing.stderr
