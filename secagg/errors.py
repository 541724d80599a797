"""Everything that can go wrong in a secure-aggregation session, as one small hierarchy.

Rule: a check that fails raises `ProtocolAbort` carrying exactly one `AbortReason` (the codes of
docs/secagg-protocol.md §6); every decryption or signature failure is the same opaque
`DecryptionFailed` so no caller can learn *why* a ciphertext or signature was refused;
malformed bytes raise `MalformedMessage`. Callers catch `SecAggError` to catch them all.
"""

from __future__ import annotations

import enum


class AbortReason(enum.IntEnum):
    """docs/secagg-protocol.md §6 reason codes; the integer is the wire value of an AbortNotice."""

    STALE_ROUND = 1
    ROSTER_MISMATCH = 2
    CONFIG_REJECTED = 3
    MODEL_HASH_MISMATCH = 4
    SIGNATURE_INVALID = 5
    DUPLICATE_KEYS = 6
    BAD_KEY = 7
    THRESHOLD_VIOLATION = 8
    OVERFLOW_RULE = 9
    SET_INCONSISTENT = 10
    DECRYPT_FAILED = 11
    CONSISTENCY_FAILED = 12
    REPLAY = 13
    ALREADY_UNMASKED = 14
    TIMEOUT = 15
    INTERNAL = 16
    # Silo-side policy refusals of a round configuration (phase 0).
    COLLUSION_BELOW_POLICY = 17  # n_colluders below the silo's floor
    LAYOUT_MISMATCH = 18  # the layout is not the silo's own model's
    TRAIN_PARAMS_REJECTED = 19  # training parameters malformed or above the silo's limits
    ROUND_ID_JUMP = 20  # round id ahead of the last accepted one by more than the silo allows


class SecAggError(Exception):
    """Base of every error raised by the secagg package."""


class ProtocolAbort(SecAggError):
    """The session is aborted for `reason`; `detail` is for logs and never holds secrets."""

    def __init__(self, reason: AbortReason, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.name}: {detail}" if detail else reason.name)


class DecryptionFailed(SecAggError):
    """A ciphertext or signature did not verify. Deliberately says nothing more."""

    def __init__(self) -> None:
        super().__init__("decryption or signature check failed")


class MalformedMessage(SecAggError):
    """Bytes that do not decode as the expected protocol message or configuration."""


class BadKey(SecAggError):
    """A public key is malformed or of low order (X25519 exchange refused it)."""


class ConfigError(SecAggError, ValueError):
    """A RoundConfig field is out of range; str() names the field and what to fix."""
