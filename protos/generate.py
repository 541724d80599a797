"""Regenerate the committed protobuf modules from federation.proto.

`python -m protos.generate [OUT_DIR]` writes federation_pb2.py, federation_pb2_grpc.py and the
mypy stubs into OUT_DIR (default: this package). tests/test_protos_fresh.py runs it into a temp
dir and compares bytes, so a stale generated module fails the suite.
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent
ROOT = PROTO_DIR.parent


def generate(out_root: Path) -> None:
    """Write the generated modules under out_root/protos/. Raises RuntimeError on failure."""
    (out_root / "protos").mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).resolve().parent / "_proto"
    bindir = Path(sys.executable).parent  # mypy-protobuf's plugins live beside the interpreter
    args = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        str(PROTO_DIR / "federation.proto"),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on protos/federation.proto")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
