"""The silo's secure-aggregation session driver: one `secagg.SiloSession`, masks in the background.

Rule: `SiloSession` is not thread-safe, so every call goes through ONE lock here. As soon as the
session has the M4 shares (stage KEYS_RECEIVED) the pairwise masks are computed on a background
thread while the model trains (numpy and OpenSSL release the GIL for the big operations);
`submit` waits for that thread, then encodes, masks and journals the update. The update is
flattened in the round's layout order, as the coordinator's `apply_aggregate` reads it back.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Mapping
from typing import Concatenate, ParamSpec, TypeVar

import numpy as np
import torch

from secagg.config import TensorSpec
from secagg.silo import MaskedUpload, SiloSession, SiloStage
from secagg.train_params import TrainValue
from silo_agent.runtime.local_model import one_torch_thread

FLATTEN_CHUNK = 1 << 16  # elements `flatten_update` subtracts at a time


class SecureSessionError(ValueError):
    """The update does not fit the round's layout; str() says which tensor."""


def flatten_update(
    trained: Mapping[str, torch.Tensor],
    received: Mapping[str, torch.Tensor],
    layout: tuple[TensorSpec, ...],
) -> np.ndarray:
    """trained - received as one float32 vector in layout order: each difference is taken in
    float64 and rounded once, a chunk at a time through two small reused buffers (model-sized
    float64 temporaries cost more in page faults than the arithmetic)."""
    with one_torch_thread():
        return _flatten_update(trained, received, layout)


def _flatten_update(
    trained: Mapping[str, torch.Tensor],
    received: Mapping[str, torch.Tensor],
    layout: tuple[TensorSpec, ...],
) -> np.ndarray:
    out = np.empty(sum(s.size for s in layout), dtype=np.float32)
    into = torch.from_numpy(out)
    a = torch.empty(FLATTEN_CHUNK, dtype=torch.float64)
    b = torch.empty(FLATTEN_CHUNK, dtype=torch.float64)
    start = 0
    for spec in layout:
        if spec.name not in trained or spec.name not in received:
            raise SecureSessionError(f"tensor {spec.name!r} of the round's layout is missing")
        t, r = trained[spec.name], received[spec.name]
        if tuple(t.shape) != spec.shape or tuple(r.shape) != spec.shape:
            raise SecureSessionError(
                f"tensor {spec.name!r} has shape {tuple(t.shape)}, the round says {spec.shape}"
            )
        t, r = t.detach().reshape(-1), r.detach().reshape(-1)
        for at in range(0, spec.size, FLATTEN_CHUNK):
            n = min(FLATTEN_CHUNK, spec.size - at)
            a[:n].copy_(t[at : at + n])
            b[:n].copy_(r[at : at + n])
            into[start + at : start + at + n].copy_(a[:n].sub_(b[:n]))
        start += spec.size
    return out


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _locked(
    method: Callable[Concatenate[SiloSession, _P], _R],
) -> Callable[Concatenate[SecureSession, _P], _R]:
    """`method` of the wrapped SiloSession, called under the SecureSession's lock."""

    def under_lock(self: SecureSession, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._lock:
            return method(self.session, *args, **kwargs)

    under_lock.__name__, under_lock.__doc__ = method.__name__, method.__doc__
    return under_lock


class SecureSession:
    """Serialised access to one SiloSession plus the background mask precomputation."""

    def __init__(self, session: SiloSession) -> None:
        self.session = session
        self._lock = threading.Lock()
        self._mask_thread: threading.Thread | None = None
        self._mask_error: BaseException | None = None
        self.precomputed_in_background = False

    @property
    def stage(self) -> SiloStage:
        return self.session.stage

    @property
    def train_params(self) -> Mapping[str, TrainValue]:
        """The signed round configuration's training parameters, checked against the policy."""
        return self.session.train_params

    # The session's own calls, each under the lock (same signature and docstring).
    handle_offer = _locked(SiloSession.handle_offer)
    deadline_passed = _locked(SiloSession.deadline_passed)

    def handle(self, data: bytes, *, now: dt.datetime) -> list[bytes]:
        with self._lock:
            replies = self.session.handle(data, now=now)
            if self.session.stage is SiloStage.KEYS_RECEIVED and self._mask_thread is None:
                self._mask_thread = threading.Thread(
                    target=self._precompute, name="secagg-masks", daemon=True
                )
                self._mask_thread.start()
            return replies

    def _precompute(self) -> None:
        try:
            with self._lock:
                if self.session.stage is SiloStage.KEYS_RECEIVED:
                    self.session.precompute_masks()
                    self.precomputed_in_background = True
        except BaseException as e:  # surfaced by submit(); the thread must not die silently
            self._mask_error = e

    def submit_update(self, delta: np.ndarray, num_examples: int) -> MaskedUpload:
        """Wait for the masks, then encode, mask and journal (before the caller sends it)."""
        with self._lock:  # handle() creates and starts the thread under this lock
            thread = self._mask_thread
        if thread is not None:
            thread.join()
        if self._mask_error is not None:
            raise self._mask_error
        with self._lock:
            return self.session.submit_update(delta, num_examples)
