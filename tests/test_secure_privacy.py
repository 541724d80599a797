"""What the coordinator receives under secure aggregation (issue 4, acceptance 2).

The coordinator runs in this process with a hook on its servicer that records every message
each silo's stream delivers; three silo agents run as real processes over mTLS on loopback. From
the recorded bytes alone the test rebuilds each silo's masked vector and shows it is
statistically independent of that silo's true update (|Pearson r| < 0.01 at d = 400 000, where
chance alone gives about 0.0016 of standard deviation), while the new global model is the true
mean within the quantisation bound. As a control the same statistic finds the true updates in
the decoded mean (r ≈ 0.58 for three independent updates), so the test can fail.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from coordinator.rounds.secure_config import SecAggSettings, WeightingMode, quantisation_bound
from coordinator.runtime.serve import Outcome
from coordinator.storage.checkpoints import CheckpointStore
from coordinator.storage.roundlog import RoundLog
from protos import federation_pb2 as pb
from tests.federation_helpers import (
    coordinator_in_process,
    processes,
    provision,
    write_coordinator_config,
    write_silo_config,
)

pytestmark = pytest.mark.e2e

D = 400_000
NAMES = ("a", "b", "c")
SPEC = "tests.test_secure_privacy:TASK"


class WideRecordingTask:
    """One flat parameter of D floats; training adds a seeded N(0, 0.01²) step and records it."""

    name = "wide-recording"

    def build_model(self) -> torch.nn.Module:
        model = torch.nn.Module()
        model.register_parameter("w", torch.nn.Parameter(torch.zeros(D)))
        return model

    def load_data(self, options: Mapping[str, Any]) -> Any:
        return dict(options)

    def train(self, model: torch.nn.Module, data: Any, params: Mapping[str, Any]) -> Any:
        from silofed import TrainResult

        gen = torch.Generator().manual_seed(17 + int(data["silo_index"]))
        step = torch.randn(D, generator=gen) * 0.01
        with torch.no_grad():
            model.get_parameter("w").add_(step)
        record = Path(data["record_dir"])
        record.mkdir(parents=True, exist_ok=True)
        torch.save(step, record / "update.pt")
        return TrainResult(10, {"loss": 0.0})

    def evaluate(self, model: torch.nn.Module, data: Any) -> dict[str, float]:
        return {"score": 0.0}


TASK = WideRecordingTask()


def _r(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(x.astype(np.float64), y.astype(np.float64))[0, 1])


def test_masked_vectors_are_independent_of_updates_yet_sum_right(tmp_path: Path) -> None:
    fed = provision(tmp_path / "fed", "priv", NAMES)
    state = tmp_path / "coord"
    secagg = {"clip_l2": 100.0, "weighting": "uniform"}
    cfg_path = write_coordinator_config(
        tmp_path / "c.toml",
        fed,
        state_dir=state,
        task_spec=SPEC,
        rounds=1,
        min_silos=3,
        aggregation="secagg",
        secagg=secagg,
    )
    received: dict[str, list[bytes]] = {}
    lock = threading.Lock()

    def record(silo_id: str, message: pb.SiloMessage) -> None:
        with lock:
            received.setdefault(silo_id, []).append(message.SerializeToString())

    outcome: list[Outcome] = []
    with (
        coordinator_in_process(cfg_path, on_receive=record) as coordinator,
        processes(tmp_path / "logs") as procs,
    ):
        for i, name in enumerate(NAMES):
            toml = write_silo_config(
                tmp_path / f"{name}.toml",
                fed.silos[name],
                port=coordinator.port,
                task_spec=SPEC,
                options={"silo_index": i, "record_dir": str(tmp_path / "sent" / name)},
                allow_plaintext_insecure=False,
            )
            procs.silo(name, toml)
        done = coordinator.drive(lambda hub: outcome.append(hub.run_rounds()))
        assert done.wait(180), procs.logs()
        assert outcome == [Outcome.FINISHED], procs.logs()

    updates = {
        f"spiffe://priv/silo/{n}": torch.load(tmp_path / "sent" / n / "update.pt").numpy()
        for n in NAMES
    }
    assert set(received) == set(updates)
    for silo_id, frames in received.items():
        masked = _masked_vector(frames)
        assert masked.shape == (D + 1,)  # element 0 carries the (masked) weight
        # The ring element as an integer, and as the signed value it would decode to.
        for view in (masked[1:].astype(np.float64), masked[1:].view(np.int32)):
            assert abs(_r(view, updates[silo_id])) < 0.01, silo_id
        # Nothing else the silo sent carries the update in the clear.
        for raw in frames:
            message = pb.SiloMessage.FromString(raw)
            if message.WhichOneof("kind") == "blob_header":
                assert message.blob_header.kind == pb.MASKED_VECTOR

    log = RoundLog.open_readonly(state / "rounds.sqlite")
    try:
        detail = log.round_detail(1)
        assert detail.status.value == "completed"
        assert detail.checkpoint is not None
        new = CheckpointStore(state / "checkpoints").load(
            detail.checkpoint.path, detail.checkpoint.sha256
        )
    finally:
        log.close()
    mean = np.mean([u.astype(np.float64) for u in updates.values()], axis=0)
    got = new["w"].double().numpy()  # the initial model is zeros: new = ḡ
    from coordinator.rounds.secure_config import build_round_config, layout_of

    round_config = build_round_config(
        SecAggSettings(clip_l2=100.0, weighting=WeightingMode.UNIFORM),
        federation_id="priv",
        roster_version=1,
        roster_digest=b"\0" * 32,
        round_id=1,
        invited=list(updates),
        model_version=0,
        model_sha256=b"\0" * 32,
        layout=layout_of(TASK.build_model().state_dict()),
        deadlines_s=(60, 60, 60, 60, 60),
    )
    bound = quantisation_bound(round_config, [10] * 3)
    assert float(np.max(np.abs(got - mean))) <= bound + float(np.max(np.abs(mean))) * 2.0**-23
    # Control: the statistic does see an update where it is present (in the decoded mean).
    for update in updates.values():
        assert _r(got, update) > 0.5


def _masked_vector(frames: list[bytes]) -> np.ndarray:
    chunks: list[bytes] = []
    for raw in frames:
        message = pb.SiloMessage.FromString(raw)
        if (
            message.WhichOneof("kind") == "blob_chunk"
            and message.blob_chunk.kind == pb.MASKED_VECTOR
        ):
            chunks.append(message.blob_chunk.data)
    return np.frombuffer(b"".join(chunks), dtype="<u4")
