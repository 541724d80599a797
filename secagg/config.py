"""RoundConfig: one round's parameters, with a canonical versioned binary form (docs/
secagg-protocol.md §4.1).

Rule: the bytes are the truth. `encode()` is fixed-width and length-prefixed, `decode()` rejects
anything else with `MalformedMessage`, and `digest()` = H(PID ‖ "/config\\0" ‖ bytes) is what every
party signs over. Field validation here is structural; policy checks live in the silo.
Everything that shapes a silo's contribution is inside these bytes, the training parameters
included (`train_params`, canonical JSON, see `secagg.train_params`), so the config digest in
every Advertise and the consistency digest bind every silo to the same values.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from secagg.codec import Reader, Writer
from secagg.errors import ConfigError, MalformedMessage
from secagg.primitives import PID, sha256
from secagg.train_params import MAX_TRAIN_PARAMS_BYTES

# 2: `train_params` appended after the deadlines (version 1 had none; it is refused).
CONFIG_VERSION = 2
PHASE_DEADLINES = ("offer", "share_keys", "train", "consistency", "unmask")
PROTOCOL = "secagg/v1"


class Weighting(enum.IntEnum):
    UNIFORM = 0
    EXAMPLES = 1


class GraphKind(enum.IntEnum):
    COMPLETE = 0
    HARARY = 1


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One tensor of the model layout: name, shape, dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, slots=True)
class DdgNoise:
    """Distributed discrete Gaussian: multiplier z, divisor n_h (docs/secagg-protocol.md §9)."""

    noise_multiplier: float
    noise_divisor: int


@dataclass(frozen=True, slots=True)
class RoundConfig:
    federation_id: str
    roster_version: int
    roster_digest: bytes
    round_id: int
    invited: tuple[str, ...]
    model_version: int
    model_sha256: bytes
    layout: tuple[TensorSpec, ...]
    scale: float
    clip_l2: float
    threshold: int
    n_colluders: int
    ring_bits: int = 32
    weight_scale: int = 1 << 16
    weighting: Weighting = Weighting.UNIFORM
    weight_max: int = 1
    graph: GraphKind = GraphKind.COMPLETE
    graph_k: int = 0
    graph_t_k: int = 0
    dp: DdgNoise | None = None
    deadlines_s: tuple[int, ...] = field(default=(60, 60, 600, 60, 60))
    protocol: str = PROTOCOL
    # Canonical JSON of the training parameters (secagg.train_params); the silo parses and
    # bounds it, this class only bounds its size.
    train_params: bytes = b"{}"

    def __post_init__(self) -> None:
        problems = []
        if len(self.roster_digest) != 32:
            problems.append("roster_digest must be 32 bytes")
        if len(self.model_sha256) != 32:
            problems.append("model_sha256 must be 32 bytes")
        if list(self.invited) != sorted(set(self.invited), key=lambda s: s.encode()):
            problems.append("invited must be sorted bytewise and unique")
        if self.ring_bits not in (32, 64):
            problems.append("ring_bits must be 32 or 64")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            problems.append("scale must be a finite number > 0")
        if not (self.clip_l2 > 0 and math.isfinite(self.clip_l2)):
            problems.append("clip_l2 must be a finite number > 0")
        if self.weight_scale < 1 or self.weight_max < 1:
            problems.append("weight_scale and weight_max must be >= 1")
        if self.graph == GraphKind.HARARY and (self.graph_k < 2 or self.graph_k % 2):
            problems.append("harary graph_k must be even and >= 2")
        if self.dp is not None and (
            not (math.isfinite(self.dp.noise_multiplier) and self.dp.noise_multiplier > 0)
            or self.dp.noise_divisor < 1
        ):
            problems.append("dp noise_multiplier must be > 0 and noise_divisor >= 1")
        if self.dp is not None and self.weighting != Weighting.UNIFORM:
            problems.append("dp requires uniform weighting")
        if any(s < 0 for spec in self.layout for s in spec.shape):
            problems.append("layout shapes must be non-negative")
        # One deadline per phase (offer, share_keys, train, consistency, unmask), each at
        # least a second: every silo arms its own timeouts from them.
        if len(self.deadlines_s) != len(PHASE_DEADLINES) or min(self.deadlines_s) < 1:
            problems.append(
                f"deadlines_s must be {len(PHASE_DEADLINES)} whole seconds >= 1 "
                f"({', '.join(PHASE_DEADLINES)})"
            )
        if len(self.train_params) > MAX_TRAIN_PARAMS_BYTES:
            problems.append(
                f"train_params is {len(self.train_params)} bytes, at most "
                f"{MAX_TRAIN_PARAMS_BYTES} allowed"
            )
        if problems:
            raise ConfigError("invalid round config: " + "; ".join(problems))

    @property
    def d(self) -> int:
        return sum(spec.size for spec in self.layout)

    @property
    def length(self) -> int:
        """L = d + 1: element 0 carries the quantised weight."""
        return self.d + 1

    def layout_sha256(self) -> bytes:
        return layout_sha256(self.layout)

    def encode(self) -> bytes:
        w = Writer().u8(CONFIG_VERSION).text(self.protocol).text(self.federation_id)
        w.u64(self.roster_version).fixed(self.roster_digest, 32).u64(self.round_id)
        w.u32(len(self.invited))
        for sid in self.invited:
            w.text(sid)
        w.u64(self.model_version).fixed(self.model_sha256, 32)
        w.u32(len(self.layout))
        for spec in self.layout:
            w.text(spec.name).u32(len(spec.shape))
            for s in spec.shape:
                w.u64(s)
            w.text(spec.dtype)
        w.fixed(self.layout_sha256(), 32)
        w.u8(self.ring_bits).f64(self.scale).u32(self.weight_scale).f64(self.clip_l2)
        w.u8(self.weighting).u64(self.weight_max).u32(self.threshold).u32(self.n_colluders)
        w.u8(self.graph).u32(self.graph_k).u32(self.graph_t_k)
        if self.dp is None:
            w.u8(0)
        else:
            w.u8(1).f64(self.dp.noise_multiplier).u32(self.dp.noise_divisor)
        w.u32(len(self.deadlines_s))
        for dl in self.deadlines_s:
            w.u32(dl)
        w.blob(self.train_params)
        return w.bytes()

    def digest(self) -> bytes:
        return config_digest(self.encode())

    @classmethod
    def decode(cls, data: bytes) -> RoundConfig:
        r = Reader(data)
        if r.u8() != CONFIG_VERSION:
            raise MalformedMessage("unknown RoundConfig version")
        try:
            protocol, fed = r.text(), r.text()
            roster_version, roster_digest, round_id = r.u64(), r.fixed(32), r.u64()
            invited = tuple(r.text() for _ in range(r.count()))
            model_version, model_sha = r.u64(), r.fixed(32)
            layout = []
            for _ in range(r.count()):
                name = r.text()
                shape = tuple(r.u64() for _ in range(r.count()))
                layout.append(TensorSpec(name, shape, r.text()))
            layout_sha = r.fixed(32)
            ring_bits, scale, weight_scale, clip = r.u8(), r.f64(), r.u32(), r.f64()
            weighting, weight_max = Weighting(r.u8()), r.u64()
            threshold, n_c = r.u32(), r.u32()
            graph, k, t_k = GraphKind(r.u8()), r.u32(), r.u32()
            dp = DdgNoise(r.f64(), r.u32()) if r.u8() == 1 else None
            deadlines = tuple(r.u32() for _ in range(r.count()))
            train_params = r.blob()
            r.end()
            cfg = cls(
                federation_id=fed,
                roster_version=roster_version,
                roster_digest=roster_digest,
                round_id=round_id,
                invited=invited,
                model_version=model_version,
                model_sha256=model_sha,
                layout=tuple(layout),
                scale=scale,
                clip_l2=clip,
                threshold=threshold,
                n_colluders=n_c,
                ring_bits=ring_bits,
                weight_scale=weight_scale,
                weighting=weighting,
                weight_max=weight_max,
                graph=graph,
                graph_k=k,
                graph_t_k=t_k,
                dp=dp,
                deadlines_s=deadlines,
                protocol=protocol,
                train_params=train_params,
            )
        except (ValueError, ConfigError) as exc:
            raise MalformedMessage(f"RoundConfig does not decode: {exc}") from exc
        if cfg.layout_sha256() != layout_sha:
            raise MalformedMessage("RoundConfig layout_sha256 does not match its layout")
        if cfg.encode() != data:
            raise MalformedMessage("RoundConfig is not in canonical form")
        return cfg


def layout_sha256(layout: tuple[TensorSpec, ...]) -> bytes:
    """H(canonical layout): a silo compares it with its own model's before anything else."""
    w = Writer().u32(len(layout))
    for spec in layout:
        w.text(spec.name).u32(len(spec.shape))
        for s in spec.shape:
            w.u64(s)
        w.text(spec.dtype)
    return sha256(w.bytes())


def config_digest(config_bytes: bytes) -> bytes:
    return sha256(PID + b"/config\x00" + config_bytes)


def minimum_threshold(n: int, n_colluders: int, t_floor: int = 3) -> int:
    """max(3, t_floor, ⌊(n + n_C)/2⌋ + 1) (docs/secagg-protocol.md §4.5)."""
    return max(3, t_floor, (n + n_colluders) // 2 + 1)


def default_colluders(n: int) -> int:
    return (n - 1) // 3
