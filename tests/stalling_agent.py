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
from collections.abc import Iterator

from protos import federation_pb2 as pb
from secagg.chunking import BlobMeta
from silo_agent.transport import connection

STALL_S = float(os.environ.get("SILOFED_TEST_STALL_S", "15"))
# With SILOFED_TEST_TRICKLE_S instead: every chunk of the first masked upload after the first
# waits that long (under the progress deadline, so only the total bound can end it).
TRICKLE_S = float(os.environ.get("SILOFED_TEST_TRICKLE_S", "0"))
_original = connection._blob_messages
_stalled = False


def _stalling(blob: connection.OutBlob, meta: BlobMeta) -> Iterator[pb.SiloMessage]:
    global _stalled
    for index, message in enumerate(_original(blob, meta)):
        if TRICKLE_S and index >= 2 and blob.kind == pb.MASKED_VECTOR and not _stalled:
            time.sleep(TRICKLE_S)
            if index == 2:
                print(f"stalling agent: trickling a chunk every {TRICKLE_S} s", flush=True)
        elif index == 2 and blob.kind == pb.MASKED_VECTOR and not _stalled:
            _stalled = True  # the header and chunk 0 were handed to gRPC
            print(f"stalling agent: upload stopped for {STALL_S} s", flush=True)
            time.sleep(STALL_S)
        yield message
    if blob.kind == pb.MASKED_VECTOR:
        _stalled = True  # only the first upload misbehaves


connection._blob_messages = _stalling

if __name__ == "__main__":
    from silo_agent.cli import main

    sys.exit(main())
