"""Constants both ends of the gRPC stream must agree on.

Rule: a figure that the coordinator and the silo agent each configure their side of gRPC with,
and that breaks the link when the two differ, is written once, here. (The messages themselves
are protos/; the protocol's own sizes, such as the chunk size, are secagg's.)
"""

from __future__ import annotations

# The largest gRPC message either side sends or accepts. Payloads (models, masked vectors) travel
# as chunks of at most secagg.chunking.MAX_CHUNK_BYTES (1 MiB), so this stays small whatever the
# model size: a peer cannot make the other buffer a huge message before any check runs.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
