"""The silo's side of the final evaluation, driven through the runner's stream handler with real
protobuf messages (built by the coordinator's own blob encoder): it evaluates only the model the
last completed round announced, at most once, and keeps it only when its policy says so."""

from __future__ import annotations

import hashlib
import random
import stat
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load

from coordinator.runtime.stream import Blob, SiloStream
from protos import federation_pb2 as pb
from protos.blobs import Serialized
from silo_agent.config import load_silo_config
from silo_agent.runtime.backoff import Backoff
from silo_agent.runtime.final_model import DIGEST_FILENAME, MODEL_FILENAME
from silo_agent.runtime.runner import SiloRunner, _RoundState
from silo_agent.runtime.secure_round import Pause
from silo_agent.transport.connection import OutBlob
from silofed import TrainResult
from silofed.tensors import state_to_bytes
from tests.federation_helpers import provision, write_silo_config

FED = "fm"
ME = f"spiffe://{FED}/silo/a"


class ScoringTask:
    """A linear model whose evaluation is its mean weight (so each model scores differently);
    counts how often it was asked to evaluate."""

    name = "scoring"

    def __init__(self) -> None:
        self.evaluations = 0

    def build_model(self) -> torch.nn.Module:
        return torch.nn.Linear(3, 2)

    def load_data(self, options: Mapping[str, Any]) -> Any:
        return dict(options)

    def train(self, model: torch.nn.Module, data: Any, params: Mapping[str, Any]) -> TrainResult:
        raise AssertionError("a final evaluation never trains")

    def evaluate(self, model: torch.nn.Module, data: Any) -> dict[str, float]:
        self.evaluations += 1
        return {"mean_weight": float(model.weight.detach().mean())}


class Recorder:
    """Stands in for the Link: what the runner sends, in order."""

    def __init__(self) -> None:
        self.sent: list[pb.SiloMessage | OutBlob] = []

    def send(self, item: pb.SiloMessage | OutBlob) -> None:
        self.sent.append(item)

    def flush(self, timeout_s: float) -> bool:
        return True

    def kinds(self) -> list[str]:
        return [m.WhichOneof("kind") for m in self.sent if isinstance(m, pb.SiloMessage)]


def model(seed: int) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    return state_to_bytes({"weight": torch.randn(2, 3, generator=gen), "bias": torch.zeros(2)})


def result(round_id: int, data: bytes) -> pb.CoordinatorMessage:
    sha = hashlib.sha256(data).digest()
    done = pb.RoundResult(
        round_id=round_id, status=pb.ROUND_STATUS_COMPLETED, new_model_sha256=sha, survivors=[ME]
    )
    return pb.CoordinatorMessage(round_result=done)


def _blob_messages(blob: Blob) -> list[pb.CoordinatorMessage]:
    """`blob` as the coordinator's stream sends it (its chunks pre-serialised), parsed."""
    stream = SiloStream("s", 0.0, 0.0, on_delivered=lambda s, r: None)
    stream.send(blob)
    frames = stream.next_messages(0)
    assert frames is not None
    return [
        pb.CoordinatorMessage.FromString(f.take()) if isinstance(f, Serialized) else f
        for f in frames
    ]


def evaluate_offer(round_id: int, data: bytes) -> list[pb.CoordinatorMessage]:
    """What the coordinator sends for a final evaluation: the offer, then the model blob."""
    sha = hashlib.sha256(data).digest()
    offer = pb.RoundOffer(
        round_id=round_id,
        aggregation=pb.AGGREGATION_EVALUATE,
        model_sha256=sha,
        model_bytes=len(data),
    )
    blob = Blob(round_id, pb.GLOBAL_MODEL, data, sha)
    return [pb.CoordinatorMessage(round_offer=offer), *_blob_messages(blob)]


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return provision(tmp_path_factory.mktemp("fed"), FED, ["a"])


def make_runner(fed: Any, tmp_path: Path, task: ScoringTask, *, keep: bool) -> SiloRunner:
    path = write_silo_config(
        tmp_path / "silo.toml",
        fed.silos["a"],
        port=1,
        task_spec="tests.federation_helpers:RECORDING_TASK",
        state_dir=tmp_path / "state",
        allow_plaintext_insecure=False,
        keep_final_model=keep,
    )
    config = load_silo_config(path)
    assert config.keep_final_model is keep
    return SiloRunner(config=config, task=task, data={}, silo_id=ME)


def pump(runner: SiloRunner, messages: list[pb.CoordinatorMessage]) -> Recorder:
    link = Recorder()
    stop = threading.Event()
    pause = Pause(None, None, runner.config.state_dir, stop, lambda: True)
    backoff = Backoff(0.1, 1.0, random.random)
    stream: Iterator[pb.CoordinatorMessage] = iter(messages)
    assert runner._pump(stream, link, backoff, _RoundState(), pause, threading.Event()) is False  # type: ignore[arg-type]
    return link


def test_only_the_announced_model_is_evaluated_and_only_once(fed: Any, tmp_path: Path) -> None:
    task = ScoringTask()
    runner = make_runner(fed, tmp_path, task, keep=False)
    final, other = model(1), model(2)

    # Before any round completed: nothing may be evaluated.
    early = pump(runner, evaluate_offer(3, final))
    (refusal,) = [m.abort for m in early.sent if isinstance(m, pb.SiloMessage)]
    assert (
        refusal.code == pb.ABORT_REASON_NOT_THE_FINAL_MODEL and "none announced" in refusal.detail
    )

    # Round 3 completed with `final`; the coordinator asks for another model, then for the right
    # model under another round's id: both refused, the task never runs.
    link = pump(runner, [result(3, final), *evaluate_offer(3, other), *evaluate_offer(2, final)])
    assert link.kinds() == ["abort", "abort"]
    codes = [m.abort.code for m in link.sent]  # type: ignore[union-attr]
    assert codes == [pb.ABORT_REASON_NOT_THE_FINAL_MODEL] * 2
    assert [m.abort.round_id for m in link.sent] == [3, 2]  # type: ignore[union-attr]
    assert task.evaluations == 0

    # The announced model: one TrainReport with eval_* metrics, no examples, no update.
    link = pump(runner, evaluate_offer(3, final))
    assert link.kinds() == ["train_report"]
    report = link.sent[0].train_report  # type: ignore[union-attr]
    assert report.round_id == 3 and report.num_examples == 0 and report.update_sha256 == b""
    expected = float(load(final)["weight"].mean())  # the score of `final` itself
    assert dict(report.metrics) == {"eval_mean_weight": pytest.approx(expected)}
    assert task.evaluations == 1

    # Asked again (a restarted coordinator): the same figures, the task is not run again; a
    # restarted agent (a new runner on the same state) still knows the model and the figures.
    again = pump(runner, evaluate_offer(3, final))
    restarted = pump(make_runner(fed, tmp_path, task, keep=False), evaluate_offer(3, final))
    for link in (again, restarted):
        assert [m.train_report.metrics for m in link.sent] == [report.metrics]  # type: ignore[union-attr]
    assert task.evaluations == 1
    # Without keep_final_model, the model is not written.
    assert not (tmp_path / "state" / MODEL_FILENAME).exists()

    # The next completed round announces a new model: the old one is refused from then on.
    link = pump(runner, [result(4, other), *evaluate_offer(3, final)])
    assert link.kinds() == ["abort"] and task.evaluations == 1


def test_keep_final_model_writes_it_privately_with_its_digest(fed: Any, tmp_path: Path) -> None:
    task = ScoringTask()
    runner = make_runner(fed, tmp_path, task, keep=True)
    final = model(7)
    link = pump(runner, [result(5, final), *evaluate_offer(5, model(8))])
    assert link.kinds() == ["abort"]
    path = tmp_path / "state" / MODEL_FILENAME
    assert not path.exists()  # a refused model is never written

    link = pump(runner, evaluate_offer(5, final))
    assert link.kinds() == ["train_report"]
    digest = hashlib.sha256(final).hexdigest()
    assert path.read_bytes() == final
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    digest_file = tmp_path / "state" / DIGEST_FILENAME
    assert digest_file.read_text() == f"{digest}  {MODEL_FILENAME}\n"
    assert stat.S_IMODE(digest_file.stat().st_mode) == 0o600


def plaintext_offer(round_id: int, data: bytes) -> list[pb.CoordinatorMessage]:
    """A plaintext-insecure offer whose model blob is `data` (hash and size consistent)."""
    sha = hashlib.sha256(data).digest()
    offer = pb.RoundOffer(
        round_id=round_id,
        aggregation=pb.AGGREGATION_PLAINTEXT_INSECURE,
        model_sha256=sha,
        model_bytes=len(data),
        train_params_json="{}",
    )
    blob = Blob(round_id, pb.GLOBAL_MODEL, data, sha)
    return [pb.CoordinatorMessage(round_offer=offer), *_blob_messages(blob)]


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"not safetensors at all" * 10, id="undecodable"),
        pytest.param(state_to_bytes({"other": torch.zeros(4)}), id="another-layout"),
    ],
)
def test_a_bad_plaintext_model_costs_the_round_not_the_agent(
    fed: Any, tmp_path: Path, data: bytes
) -> None:
    """Review finding: with the insecure baseline allowed, a model that does not decode or is not
    the task's made the agent exit. Now the round is refused (TRAINING_FAILED) and the agent
    keeps pumping: the next message is still handled."""
    path = write_silo_config(
        tmp_path / "silo.toml",
        fed.silos["a"],
        port=1,
        task_spec="tests.federation_helpers:RECORDING_TASK",
        state_dir=tmp_path / "state",
        allow_plaintext_insecure=True,
    )
    runner = SiloRunner(config=load_silo_config(path), task=ScoringTask(), data={}, silo_id=ME)
    link = pump(runner, [*plaintext_offer(5, data), result(5, model(1))])
    aborts = [m.abort for m in link.sent if isinstance(m, pb.SiloMessage) and m.HasField("abort")]
    assert [a.code for a in aborts] == [pb.ABORT_REASON_TRAINING_FAILED], link.kinds()
    assert not any(isinstance(m, OutBlob) for m in link.sent)  # nothing was uploaded


def _stops(runner: SiloRunner, notice: pb.AbortNotice) -> bool:
    """Whether the runner's stream loop ends for good on `notice` (True), rather than at the
    end of the stream (False)."""
    pause = Pause(None, None, runner.config.state_dir, threading.Event(), lambda: True)
    stream = iter([pb.CoordinatorMessage(abort=notice)])
    backoff = Backoff(0.1, 1.0, random.random)
    return runner._pump(stream, Recorder(), backoff, _RoundState(), pause, threading.Event())  # type: ignore[arg-type]


def test_the_silo_ends_on_the_coordinators_finished_code(fed: Any, tmp_path: Path) -> None:
    runner = make_runner(fed, tmp_path, ScoringTask(), keep=False)
    finished = pb.ABORT_REASON_FEDERATION_FINISHED
    assert _stops(runner, pb.AbortNotice(code=finished, detail="all rounds ran"))
    assert not _stops(runner, pb.AbortNotice(code=pb.ABORT_REASON_COORDINATOR_STOPPING))
    assert not _stops(runner, pb.AbortNotice(round_id=7, code=pb.ABORT_REASON_TIMEOUT))
    # A newer coordinator's code this silo does not know is one more abort, not a crash.
    assert not _stops(runner, pb.AbortNotice(round_id=7, code=999))  # type: ignore[arg-type]
