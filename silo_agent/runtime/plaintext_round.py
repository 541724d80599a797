"""A plaintext-insecure round on the silo: evaluate the received model, train, upload in clear.

Rule: the runner calls this only when this silo's operator opted in (`[secagg]
allow_plaintext_insecure = true`). The offer's [train] table is checked under the same rules as
a secure round's signed parameters; a refused table or a failed training costs this round only
(an AbortNotice says why), never the agent. The update is `trained - received`, reported with
`eval_*` (the received model on local held-out data) and `train_*` metrics.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from protos import federation_pb2 as pb
from secagg.train_params import TrainParamsError, parse_train_params
from silo_agent.observability.progress import training_progress
from silo_agent.runtime.local_model import LocalTraining, fresh_seed, prefixed
from silo_agent.transport.connection import OutBlob
from silofed.task import Task
from silofed.tensors import state_from_bytes, state_to_bytes

log = logging.getLogger("silofed.silo")


class OfferRefused(Exception):
    """A plaintext offer this silo will not train on; str() says why (sent to the coordinator)."""


@dataclass(frozen=True, slots=True)
class PlaintextRound:
    task: Task
    data: Any
    train_limits: Mapping[str, float]  # [secagg] train_limits
    send: Callable[[pb.SiloMessage | OutBlob], None]
    training: LocalTraining | None = None  # None: `task.train` in this process

    def take_part(self, offer: pb.RoundOffer, model_bytes: bytes) -> None:
        try:
            params = _plaintext_train_params(offer, self.train_limits)
        except OfferRefused as exc:
            log.warning("round %d: declined: %s", offer.round_id, exc)
            notice = pb.AbortNotice(
                round_id=offer.round_id, code=pb.ABORT_REASON_TRAIN_PARAMS_REJECTED, detail=str(exc)
            )
            self.send(pb.SiloMessage(abort=notice))
            return
        try:
            self._train_and_upload(offer, model_bytes, params)
        except Exception as exc:  # bad model bytes or layout, a task bug: drop this round only
            log.warning("round %d: plaintext round failed: %s: %s", offer.round_id,
                        type(exc).__name__, exc)  # fmt: skip
            detail = f"local training failed: {type(exc).__name__}: {exc}"[:512]
            notice = pb.AbortNotice(
                round_id=offer.round_id, code=pb.ABORT_REASON_TRAINING_FAILED, detail=detail
            )
            self.send(pb.SiloMessage(abort=notice))

    def _train_and_upload(
        self, offer: pb.RoundOffer, model_bytes: bytes, params: Mapping[str, Any]
    ) -> None:
        round_id = offer.round_id
        received = state_from_bytes(model_bytes)
        model = self.task.build_model()
        model.load_state_dict(received)
        started = time.monotonic()
        evaluated = prefixed(self.task.evaluate(model, self.data), "eval_")
        with training_progress(round_id) as tick:  # a bar on a terminal; else a no-op
            own = {"round": round_id, "seed": fresh_seed(), "progress": tick}
            training = self.training or LocalTraining(self.task, self.data)
            result = training.train(model, {**params, **own})
        trained = model.state_dict()
        delta = {k: trained[k].detach() - received[k] for k in received}
        update = state_to_bytes(delta)
        digest = hashlib.sha256(update).digest()
        metrics = {**evaluated, **prefixed(result.metrics, "train_")}
        self.send(
            pb.SiloMessage(
                train_report=pb.TrainReport(
                    round_id=round_id,
                    num_examples=result.num_examples,
                    metrics=metrics,
                    update_sha256=digest,
                )
            )
        )
        self.send(OutBlob(round_id, pb.PLAINTEXT_UPDATE, update))
        shown = " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
        log.info(
            "round %d: trained on %d examples in %.2f s; %s; uploading %d bytes",
            round_id,
            result.num_examples,
            time.monotonic() - started,
            shown,
            len(update),
        )


def _plaintext_train_params(offer: pb.RoundOffer, limits: Mapping[str, float]) -> dict[str, Any]:
    """The coordinator's [train] table of a plaintext round, under the same rules as a secure
    round's signed parameters (secagg.train_params). Raises OfferRefused."""
    try:
        return dict(parse_train_params(offer.train_params_json.encode() or b"{}", limits))
    except TrainParamsError as exc:
        raise OfferRefused(str(exc)) from exc
