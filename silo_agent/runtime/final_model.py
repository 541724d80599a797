"""The federation's final model on a silo: evaluated once when asked, kept if policy says so.

Rule: a coordinator may ask for an evaluation (a RoundOffer of aggregation AGGREGATION_EVALUATE) of
ONE model only: the one announced by the last completed RoundResult this silo received
(`new_model_sha256`, with that result's round id). Any other model is refused with an
AbortNotice `NOT_THE_FINAL_MODEL`, before a byte of it is used, so a coordinator cannot query
this silo's data with models of its choosing. Each model is evaluated at most once: asked
again (a coordinator restarted during its final evaluation), the silo sends the same figures
again without running the task. Every round's own report already carries `eval_*` figures of
the model the silo received, so this reveals nothing a round would not.

The answer is a TrainReport: the round id, `eval_*` metrics from `Task.evaluate`, no example
count (0), no update. With `[silo] keep_final_model = true` the model is also written to
`<state_dir>/final-model.safetensors` (0600, atomically: temporary file, fsync, rename) with its
SHA-256 in `<state_dir>/final-model.sha256` (`sha256sum -c` format). What was announced and
evaluated is kept in `<state_dir>/final-model.json` (0600), so a restarted agent still knows it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from protos import federation_pb2 as pb
from protos.names import abort_name
from silo_agent.runtime.local_model import prefixed
from silofed.files import write_atomically
from silofed.task import Task
from silofed.tensors import state_from_bytes

log = logging.getLogger("silofed.silo")

STATE_FILENAME = "final-model.json"
MODEL_FILENAME = "final-model.safetensors"
DIGEST_FILENAME = "final-model.sha256"

Send = Callable[[pb.SiloMessage], None]


@dataclass(frozen=True, slots=True)
class Announced:
    """The model of the last completed round this silo was told of, and its evaluation."""

    round_id: int
    model_sha256: str  # hex
    metrics: Mapping[str, float] | None = None  # set once evaluated

    def to_json(self) -> str:
        metrics = None if self.metrics is None else dict(sorted(self.metrics.items()))
        doc = {"round_id": self.round_id, "model_sha256": self.model_sha256, "metrics": metrics}
        return json.dumps(doc, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> Announced:
        """Raises ValueError (or KeyError, TypeError) if `text` is not what `to_json` wrote."""
        doc = json.loads(text)
        metrics = doc["metrics"]
        if metrics is not None:
            metrics = {str(k): float(v) for k, v in metrics.items()}
        sha = str(doc["model_sha256"])
        if len(bytes.fromhex(sha)) != 32:
            raise ValueError("model_sha256 is not a SHA-256")
        return Announced(int(doc["round_id"]), sha, metrics)


class FinalModel:
    """The silo's side of the final evaluation (used by the runner on its stream thread)."""

    def __init__(self, state_dir: Path, *, keep: bool, task: Task, data: Any) -> None:
        self.state_dir = state_dir
        self.keep = keep
        self.task = task
        self.data = data
        self.announced = self._load()

    # ---- what the coordinator announced --------------------------------------------------

    def on_result(self, result: pb.RoundResult) -> None:
        """Remember the model a completed round produced: the only one this silo evaluates."""
        if result.status != pb.ROUND_STATUS_COMPLETED or len(result.new_model_sha256) != 32:
            return
        sha = result.new_model_sha256.hex()
        known = self.announced
        if known is not None and (known.round_id, known.model_sha256) == (result.round_id, sha):
            return
        self._save(Announced(result.round_id, sha))

    # ---- an "evaluate" offer -------------------------------------------------------------

    def screen(self, offer: pb.RoundOffer, send: Send) -> bool:
        """False (and the refusal sent) for an "evaluate" offer of another model than the
        announced one, before its model is downloaded; True for any other offer."""
        return offer.aggregation != pb.AGGREGATION_EVALUATE or self.admits(offer, send)

    def admits(self, offer: pb.RoundOffer, send: Send) -> bool:
        """True if `offer` asks for the announced model; else refuse it (sent) and say False."""
        known = self.announced
        if known is not None and (offer.round_id, offer.model_sha256.hex()) == (
            known.round_id,
            known.model_sha256,
        ):
            return True
        expected = (
            "none announced yet"
            if known is None
            else f"round {known.round_id}'s model {known.model_sha256[:12]}"
        )
        detail = (
            f"this silo evaluates only the model of the last completed round it was told of "
            f"({expected}); asked for round {offer.round_id}'s model "
            f"{offer.model_sha256.hex()[:12]}"
        )
        self._refuse(offer, pb.ABORT_REASON_NOT_THE_FINAL_MODEL, detail, send)
        return False

    def evaluate(self, offer: pb.RoundOffer, model_bytes: bytes, send: Send) -> None:
        """Evaluate the announced model (once), keep it if the policy says so, and report."""
        if not self.admits(offer, send):
            return
        known = self.announced
        assert known is not None
        if hashlib.sha256(model_bytes).hexdigest() != known.model_sha256:
            # The transport checked the blob against the offer; this guards the rule itself.
            self._refuse(
                offer,
                pb.ABORT_REASON_NOT_THE_FINAL_MODEL,
                "its bytes are not the announced model's",
                send,
            )
            return
        if self.keep:
            try:
                self._keep(model_bytes, known)
            except OSError as exc:  # the evaluation is still answered
                log.error(
                    "keep_final_model: cannot write the final model to %s: %s; check [silo] "
                    "state_dir",
                    self.state_dir,
                    exc.strerror or exc,
                )
        metrics = known.metrics
        if metrics is None:
            try:
                model = self.task.build_model()
                model.load_state_dict(state_from_bytes(model_bytes))
                metrics = prefixed(self.task.evaluate(model, self.data), "eval_")
            except Exception as exc:  # noqa: BLE001 - a task bug must not stop the agent
                log.exception("final evaluation of round %d's model failed", offer.round_id)
                failure = f"{type(exc).__name__}: {exc}"
                self._refuse(offer, pb.ABORT_REASON_EVALUATION_FAILED, failure, send)
                return
            self._save(replace(known, metrics=metrics))
        else:
            log.info("round %d's model was already evaluated: same figures", offer.round_id)
        report = pb.TrainReport(round_id=offer.round_id, num_examples=0, metrics=metrics)
        send(pb.SiloMessage(train_report=report))
        shown = " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
        log.info("final evaluation of round %d's model: %s", offer.round_id, shown)

    @staticmethod
    def _refuse(
        offer: pb.RoundOffer, code: pb.AbortReason.ValueType, detail: str, send: Send
    ) -> None:
        log.warning(
            "final evaluation of round %d declined: %s: %s",
            offer.round_id,
            abort_name(code),
            detail,
        )
        notice = pb.AbortNotice(round_id=offer.round_id, code=code, detail=detail)
        send(pb.SiloMessage(abort=notice))

    # ---- files ---------------------------------------------------------------------------

    def _keep(self, model_bytes: bytes, known: Announced) -> None:
        path, digest_path = self.state_dir / MODEL_FILENAME, self.state_dir / DIGEST_FILENAME
        line = f"{known.model_sha256}  {MODEL_FILENAME}\n"
        try:
            if digest_path.read_text() == line and _sha256_of(path) == known.model_sha256:
                return  # already kept
        except OSError:
            pass
        _write_private(path, model_bytes)
        _write_private(digest_path, line.encode())
        log.info(
            "kept the final model (round %d, sha256 %s) in %s; its digest is in %s",
            known.round_id,
            known.model_sha256,
            path,
            digest_path,
        )

    def _load(self) -> Announced | None:
        path = self.state_dir / STATE_FILENAME
        try:
            return Announced.from_json(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Only this silo writes it; a damaged file costs at most one final evaluation.
            log.warning("ignoring %s (%s); it is rewritten at the next completed round", path, exc)
            return None

    def _save(self, announced: Announced) -> None:
        self.announced = announced
        path = self.state_dir / STATE_FILENAME
        try:
            _write_private(path, announced.to_json().encode())
        except OSError as exc:  # kept in memory: only a restarted agent would not know it
            log.warning("cannot write %s (%s); check [silo] state_dir", path, exc.strerror or exc)


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically, readable by this user only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, data, mode=0o600)
