"""`python -m tests.stalling_agent run --config ...`: the real silo agent, patched to stall once.

Rule: everything is the agent's own code but one thing: its first masked-vector upload stops
after the header and the first chunk for `SILOFED_TEST_STALL_S` seconds (the stream stays
open, nothing else is sent meanwhile), then goes on. The hostile-silo tests use it as a member
that takes an upload slot and stops feeding it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator

from protos import federation_pb2 as pb
from protos.blobs import blob_messages
from secagg.chunking import BlobMeta
from silo_agent.transport import connection

STALL_S = float(os.environ.get("SILOFED_TEST_STALL_S", "15"))
# With SILOFED_TEST_TRICKLE_S instead: every chunk of the first masked upload after the first
# waits that long (under the progress deadline, so only the total bound can end it).
TRICKLE_S = float(os.environ.get("SILOFED_TEST_TRICKLE_S", "0"))
_original = blob_messages  # what the agent's stream frames with (connection.blob_messages)
_stalled = False


def _stalling(
    message_type: Callable[..., pb.SiloMessage],
    *,
    round_id: int,
    kind: pb.BlobKind.ValueType,
    data: bytes | memoryview,
    meta: BlobMeta,
    protocol_header: bytes = b"",
) -> Iterator[pb.SiloMessage]:
    global _stalled
    messages = _original(
        message_type,
        round_id=round_id,
        kind=kind,
        data=data,
        meta=meta,
        protocol_header=protocol_header,
    )
    for index, message in enumerate(messages):
        if TRICKLE_S and index >= 2 and kind == pb.MASKED_VECTOR and not _stalled:
            time.sleep(TRICKLE_S)
            if index == 2:
                print(f"stalling agent: trickling a chunk every {TRICKLE_S} s", flush=True)
        elif index == 2 and kind == pb.MASKED_VECTOR and not _stalled:
            _stalled = True  # the header and chunk 0 were handed to gRPC
            print(f"stalling agent: upload stopped for {STALL_S} s", flush=True)
            time.sleep(STALL_S)
        yield message
    if kind == pb.MASKED_VECTOR:
        _stalled = True  # only the first upload misbehaves


connection.blob_messages = _stalling  # type: ignore[attr-defined,assignment]

if __name__ == "__main__":
    from silo_agent.cli import main

    sys.exit(main())
