"""The committed generated modules must equal what protoc makes from federation.proto now."""

from __future__ import annotations

from pathlib import Path

from protos.generate import PROTO_DIR, generate

GENERATED = [
    "federation_pb2.py",
    "federation_pb2.pyi",
    "federation_pb2_grpc.py",
    "federation_pb2_grpc.pyi",
]


def test_generated_modules_are_fresh(tmp_path: Path) -> None:
    generate(tmp_path)
    stale = [
        name
        for name in GENERATED
        if (tmp_path / "protos" / name).read_bytes() != (PROTO_DIR / name).read_bytes()
    ]
    assert not stale, f"regenerate with `make protos`: stale {stale}"
