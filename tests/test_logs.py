"""`--log-format json`: stderr carries only JSON objects, grpc core's own lines included.

grpc's C core writes straight to file descriptor 2 (e.g. the cause of a refused TLS handshake);
in JSON mode `setup_logging` reroutes fd 2 so those lines arrive as JSON objects too. Checked
in child processes (the redirect is per process) and on a real coordinator whose TLS handshake
a plain-TCP client breaks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import grpc
import pytest

from protos import federation_pb2 as pb
from protos import federation_pb2_grpc as pb_grpc
from silofed.logs import foreign_line_to_json
from tests.federation_helpers import REPO, NewFederation, child_env

GRPC_LINE = (
    "I0000 00:00:1764749234.123456   12345 ssl_transport_security.cc:1653] "
    "Handshake failed with error SSL_ERROR_SSL: error:100000f7:SSL routines:"
    "OPENSSL_internal:WRONG_VERSION_NUMBER"
)


def test_foreign_lines_become_json() -> None:
    convert = foreign_line_to_json
    doc = json.loads(convert(GRPC_LINE + "\n", 1764749234.5))
    assert doc["logger"] == "grpc" and doc["level"] == "INFO"
    assert doc["source"] == "ssl_transport_security.cc:1653"
    assert doc["message"].startswith("Handshake failed") and doc["ts"].startswith("2025-12-03T")
    err = json.loads(convert("E1128 17:05:00.123456  77 chttp2_server.cc:9] bind failed", 0.0))
    assert (err["level"], err["logger"], err["message"]) == ("ERROR", "grpc", "bind failed")
    other = json.loads(convert("Traceback (most recent call last):\n", 0.0))
    assert (other["logger"], other["level"]) == ("stderr", "WARNING")
    assert other["message"] == "Traceback (most recent call last):"
    ours = '{"ts": "x", "level": "INFO", "logger": "a", "message": "m"}'
    assert convert(ours + "\n", 0.0) == ours


CHILD = textwrap.dedent(
    """
    import logging, os, sys
    from silofed.logs import setup_logging
    setup_logging("INFO", "json")
    logging.getLogger("silofed.test").info("from logging", extra={{"round": 7}})
    os.write(2, {grpc_line!r}.encode() + b"\\n")
    print("a print to stderr", file=sys.stderr)
    raise RuntimeError("boom")
    """
)


def test_every_stderr_line_is_json_in_a_child() -> None:
    child = subprocess.run(
        [sys.executable, "-c", CHILD.format(grpc_line=GRPC_LINE)],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 1, child.stderr  # the crash still ends the process
    docs = [json.loads(line) for line in child.stderr.splitlines()]  # each line parses
    by_logger: dict[str, list[dict[str, object]]] = {}
    for doc in docs:
        assert {"ts", "level", "logger", "message"} <= set(doc), doc
        by_logger.setdefault(str(doc["logger"]), []).append(doc)
    assert by_logger["silofed.test"][0]["round"] == 7
    assert str(by_logger["grpc"][0]["message"]).startswith("Handshake failed")
    texts = [d["message"] for d in by_logger["stderr"]]
    assert "a print to stderr" in texts and "RuntimeError: boom" in texts, texts


def test_text_mode_leaves_stderr_alone() -> None:
    code = (
        "import logging, os\nfrom silofed.logs import setup_logging\n"
        "setup_logging('INFO', 'text')\nlogging.getLogger('t').info('plain')\n"
        f"os.write(2, {GRPC_LINE!r}.encode() + b'\\n')\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    lines = child.stderr.splitlines()
    assert lines[0].endswith("INFO t: plain") and lines[1] == GRPC_LINE, lines


@pytest.mark.e2e
def test_coordinator_handshake_refusal_is_logged_as_json(federation: NewFederation) -> None:
    run = federation("jsonfed", ["a"])
    procs = run.procs
    cfg = run.coordinator_config("coord.toml", rounds=1, min_silos=1, start_timeout_s=120)
    coordinator = run.start_coordinator(cfg, "--log-format", "json")
    port = run.listening(coordinator)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.FederationStub(channel)
        with pytest.raises(grpc.RpcError):
            list(stub.Connect(iter([pb.SiloMessage(hello=pb.Hello())]), timeout=10))
    # grpc core's INFO line with the cause, now a JSON object.
    coordinator.wait_for_log(r'"logger": "grpc".*Handshake failed.*WRONG_VERSION_NUMBER', 20)
    procs.stop(coordinator)
    lines = [x for x in coordinator.log().splitlines() if x.strip()]
    docs = [json.loads(x) for x in lines]  # every line, grpc's included
    assert any(d["logger"] == "silofed.coordinator" for d in docs)
