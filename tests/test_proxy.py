"""Outbound proxy: `[coordinator] proxy` makes the silo dial through an HTTP CONNECT proxy.

The key is checked when the config loads (http://host:port only, and not silently bypassed by a
no_proxy entry). End to end, a small CONNECT proxy written here (threads, loopback only, every
wait bounded, stopped at the end) logs each tunnel; a federation round completes while two silos
dial through it, with mutual TLS end to end inside the tunnel, and a third silo, without the key
but with proxy variables in its environment, dials directly: gRPC's own reading of
grpc_proxy/https_proxy/http_proxy is off unless the key is set. Each tunnel is matched to the
silo process holding its client socket (/proc).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import select
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from silo_agent.commands.check import CheckResult, run_checks
from silo_agent.config import ConfigError, load_silo_config, no_proxy_bypass
from silo_agent.transport.connection import channel_options, proxy_options
from tests.federation_helpers import NewFederation, Proc, write_recording_silo_config

# ---- the key ----------------------------------------------------------------------------------

SILO = """
[silo]
name = "a"
state_dir = "state"
[coordinator]
address = "coordinator.example.org:7443"
{proxy}
[tls]
ca_cert = "ca.pem"
cert = "s.pem"
key = "s.key"
roster = "roster.json"
[task]
spec = "examples.hospital.task:TASK"
"""
PROXY_ENV = ("grpc_proxy", "https_proxy", "http_proxy", "no_grpc_proxy", "no_proxy")


@pytest.fixture
def silo_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in PROXY_ENV:
        monkeypatch.delenv(name, raising=False)
    for name in ("ca.pem", "s.pem", "s.key", "roster.json"):
        (tmp_path / name).write_text("x")
    return tmp_path / "s.toml"


def _load(path: Path, proxy_line: str) -> str | None:
    path.write_text(SILO.format(proxy=proxy_line))
    return load_silo_config(path).proxy


@pytest.mark.parametrize(
    ("value", "loaded"),
    [
        ("http://proxy.hospital.internal:3128", "http://proxy.hospital.internal:3128"),
        ("http://10.1.2.3:8080/", "http://10.1.2.3:8080"),
        ("http://[fd00::1]:3128", "http://[fd00::1]:3128"),
    ],
)
def test_a_proxy_url_loads(silo_toml: Path, value: str, loaded: str) -> None:
    assert _load(silo_toml, f'proxy = "{value}"') == loaded


def test_no_proxy_key_means_none(silo_toml: Path) -> None:
    assert _load(silo_toml, "") is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("https://proxy:3128", r"gRPC speaks plain HTTP to the proxy"),
        ("socks5://proxy:1080", r"must be http://host:port"),
        ("http://proxy", r"must be http://host:port"),
        ("http://proxy:99999", r"must be http://host:port"),
        ("http://proxy:0", r"must be http://host:port"),
        ("proxy:3128", r"must be http://host:port"),
        ("http://user:secret@proxy:3128", r"credentials in the URL are not supported"),
        ("http://proxy:3128/path", r"nothing may follow the port"),
    ],
)
def test_a_bad_proxy_is_refused_naming_the_key(silo_toml: Path, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        _load(silo_toml, f'proxy = "{value}"')
    assert str(info.value).startswith(f"{silo_toml}: [coordinator] proxy "), info.value


def test_a_no_proxy_entry_that_would_bypass_the_proxy_is_refused(
    silo_toml: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("no_proxy", "localhost, .example.org")
    with pytest.raises(ConfigError, match=r"proxy would be bypassed: .*lists '\.example\.org'"):
        _load(silo_toml, 'proxy = "http://proxy:3128"')
    # gRPC reads no_grpc_proxy before no_proxy: an empty one lists nothing.
    monkeypatch.setenv("no_grpc_proxy", "")
    assert _load(silo_toml, 'proxy = "http://proxy:3128"') == "http://proxy:3128"


@pytest.mark.parametrize(
    ("address", "environ", "bypassed"),
    [
        ("10.0.0.5:7443", {"no_proxy": "10.0.0.0/8"}, True),
        ("10.0.0.5:7443", {"no_proxy": "192.168.0.0/16,example.org"}, False),
        ("[fd00::5]:7443", {"no_proxy": "fd00::/8"}, True),
        ("coord.example.org:7443", {"no_proxy": "EXAMPLE.org"}, True),
        ("coord.example.org:7443", {"no_grpc_proxy": "other.org", "no_proxy": "org"}, False),
        ("coord.example.org:7443", {}, False),
    ],
)
def test_no_proxy_is_read_as_grpc_reads_it(
    address: str, environ: dict[str, str], bypassed: bool
) -> None:
    assert (no_proxy_bypass(address, environ) is not None) is bypassed


def test_the_environment_proxy_is_off_unless_configured() -> None:
    assert ("grpc.enable_http_proxy", 0) in channel_options(20, 10)
    assert proxy_options("http://p:1") == [
        ("grpc.enable_http_proxy", 1),
        ("grpc.http_proxy", "http://p:1"),
    ]


# ---- a CONNECT proxy --------------------------------------------------------------------------


@dataclass(frozen=True)
class Tunnel:
    client: tuple[str, int]  # the silo's end of its connection to the proxy
    target: str  # the CONNECT request's host:port
    first_bytes: bytes  # the first bytes the silo sent through the tunnel


class ConnectProxy:
    """An HTTP CONNECT proxy on 127.0.0.1 that opens tunnels only to `allowed` targets and logs
    every request: `tunnels` (opened) and `refused` (target, reason). At most `MAX_CLIENTS`
    connections; every socket wait is bounded; `stop` ends everything within seconds."""

    MAX_CLIENTS = 16
    HEAD_MAX = 8192

    def __init__(self, allowed: set[str]) -> None:
        self.allowed = allowed
        self.tunnels: list[Tunnel] = []
        self.refused: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self.port = int(self._server.getsockname()[1])
        self._start(self._accept, "proxy accept")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _start(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _keep(self, s: socket.socket) -> None:
        with self._lock:
            self._sockets.append(s)

    def _accept(self) -> None:
        clients = 0
        while not self._stop.is_set():
            try:
                client, address = self._server.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by stop()
                return
            clients += 1
            self._keep(client)
            if clients > self.MAX_CLIENTS:
                client.close()
                continue
            self._start(self._handle, f"proxy {address}", client, address)

    def _handle(self, client: socket.socket, address: tuple[str, int]) -> None:
        client.settimeout(10)
        head = b""
        try:
            while b"\r\n\r\n" not in head and len(head) < self.HEAD_MAX:
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
        except OSError:
            return
        request, _, rest = head.partition(b"\r\n\r\n")
        words = request.split(b"\r\n", 1)[0].decode("latin-1").split()
        target = words[1] if len(words) == 3 else ""
        if len(words) != 3 or words[0] != "CONNECT" or target not in self.allowed:
            self._refuse(client, target, "403 Forbidden")
            return
        host, _, port = target.rpartition(":")
        try:
            upstream = socket.create_connection((host, int(port)), timeout=5)
        except OSError as exc:
            self._refuse(client, target, f"502 Bad Gateway ({exc})")
            return
        self._keep(upstream)
        upstream.settimeout(30)
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self._pump(client, upstream, address, target, rest)

    def _refuse(self, client: socket.socket, target: str, status: str) -> None:
        with self._lock:
            self.refused.append((target, status))
        with contextlib.suppress(OSError):
            client.sendall(f"HTTP/1.1 {status.split(' (')[0]}\r\n\r\n".encode())
        client.close()

    def _pump(
        self,
        client: socket.socket,
        upstream: socket.socket,
        address: tuple[str, int],
        target: str,
        early: bytes,
    ) -> None:
        """Copy bytes both ways until either side closes or the proxy stops; logs the tunnel
        with its first client bytes once they came."""
        first = early
        if early:
            upstream.sendall(early)
        logged = False
        peer = {client: upstream, upstream: client}
        try:
            while not self._stop.is_set():
                if not logged and len(first) >= 3:
                    with self._lock:
                        self.tunnels.append(Tunnel(address, target, first[:3]))
                    logged = True
                ready, _, _ = select.select([client, upstream], [], [], 0.2)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    if s is client and not logged:
                        first += data
                    peer[s].sendall(data)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()

    def stop(self) -> None:
        self._stop.set()
        self._server.close()
        with self._lock:
            sockets = list(self._sockets)
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for thread in self._threads:
            thread.join(5)
        assert not any(t.is_alive() for t in self._threads), "proxy threads did not stop"


@pytest.fixture
def proxy_for() -> Iterator[list[ConnectProxy]]:
    started: list[ConnectProxy] = []
    try:
        yield started
    finally:
        for proxy in started:
            proxy.stop()


# ---- which process holds a socket (loopback IPv4) ---------------------------------------------

LOOPBACK = "0100007F"  # 127.0.0.1 as /proc/net/tcp writes it (tcp6: the v4-mapped form ends so)


ESTABLISHED = "01"  # the state column of /proc/net/tcp


def _tcp_sockets() -> list[tuple[str, str, str, str]]:
    """(local, remote, state, inode) of every TCP socket, IPv4 and IPv6 (gRPC's sockets are
    dual-stack IPv6 ones, a v4 address mapped into them)."""
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            rows.append((fields[1], fields[2], fields[3], fields[9]))
    return rows


def _on_loopback(address: str, port: int) -> bool:
    host, _, hex_port = address.partition(":")
    return host.endswith(LOOPBACK) and int(hex_port, 16) == port


def _socket_inode(local_port: int) -> str | None:
    """The inode of the established TCP socket bound to 127.0.0.1:`local_port`. Only an
    established one: an earlier connection from the same ephemeral port may linger in
    TIME_WAIT, listed with inode 0, which no process holds."""
    found = [
        inode
        for local, _, state, inode in _tcp_sockets()
        if state == ESTABLISHED and inode != "0" and _on_loopback(local, local_port)
    ]
    return found[0] if found else None


def _socket_links(pid: int) -> set[str]:
    """What the file descriptors of process `pid` point to ("socket:[inode]", paths...)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    links = set()
    for fd in os.listdir(fd_dir):
        try:
            links.add(os.readlink(fd_dir / fd))
        except OSError:  # closed meanwhile
            continue
    return links


def _owners(inode: str, procs: dict[str, Proc]) -> list[str]:
    """The names of the processes in `procs` holding socket `inode`."""
    return [name for name, proc in procs.items() if f"socket:[{inode}]" in _socket_links(proc.pid)]


def _connected_to(pid: int, port: int) -> bool:
    """Whether process `pid` holds an established TCP socket to 127.0.0.1:`port`."""
    inodes = {
        inode
        for _, remote, state, inode in _tcp_sockets()
        if state == ESTABLISHED and _on_loopback(remote, port)
    }
    links = _socket_links(pid)
    return any(f"socket:[{inode}]" in links for inode in inodes)


# ---- end to end -------------------------------------------------------------------------------

PROXIED = ("a", "b")
DIRECT = "c"  # no `proxy` key, proxy variables in its environment
ROUND_WITH_ALL = r"round (\d+) completed with 3 silos \(included us\)"


@pytest.mark.e2e
def test_a_round_completes_with_silos_dialing_through_a_connect_proxy(
    tmp_path: Path, proxy_for: list[ConnectProxy], federation: NewFederation
) -> None:
    run = federation("proxied", [*PROXIED, DIRECT])  # its processes stopped after the test
    config = run.endless_config(min_silos=3, sleep_s=0.1)
    coordinator = run.start_coordinator(config)
    port = run.listening(coordinator)
    coordinator_address = f"127.0.0.1:{port}"
    proxy = ConnectProxy({coordinator_address})
    proxy_for.append(proxy)
    # Nothing in the environment may bypass the proxy, or apply it where it is not set.
    quiet = {"no_proxy": "", "no_grpc_proxy": ""}
    loud = {"grpc_proxy": proxy.url, "https_proxy": proxy.url, "http_proxy": proxy.url}
    silos: dict[str, Proc] = {}
    for name in (*PROXIED, DIRECT):
        toml = write_recording_silo_config(
            tmp_path / f"{name}.toml",
            run.fed,
            name,
            port=port,
            num_examples=5,
            record_root=tmp_path / "sent",
        )
        if name in PROXIED:
            key = f'[coordinator]\nproxy = "{proxy.url}"\n'
            toml.write_text(toml.read_text().replace("[coordinator]\n", key))
        silos[name] = run.procs.start(
            f"silo-{name}",
            ["-m", "silo_agent", "run", "--config", str(toml)],
            env=quiet if name in PROXIED else {**quiet, **loud},
        )
    for silo in silos.values():
        silo.wait_for_log(ROUND_WITH_ALL, 180)
        assert silo.popen.poll() is None, silo.log()[-3000:]

    # One tunnel per proxied silo, to the coordinator, carrying TLS (a handshake record
    # first: the proxy relays bytes it cannot read, the silo's certificate inside them).
    tunnels = list(proxy.tunnels)
    assert proxy.refused == [], proxy.refused
    assert [t.target for t in tunnels] == [coordinator_address] * len(PROXIED), tunnels
    assert all(t.first_bytes[:2] == b"\x16\x03" for t in tunnels), tunnels
    owners = []
    for tunnel in tunnels:
        inode = _socket_inode(tunnel.client[1])
        assert inode is not None, f"the tunnel from {tunnel.client} is gone"
        owners += _owners(inode, silos)
    assert sorted(owners) == sorted(PROXIED), (owners, tunnels)
    # The silo without the key ignored the proxy variables and dialed the coordinator.
    assert _connected_to(silos[DIRECT].pid, port), "silo c has no direct connection"
    # The coordinator saw each proxied silo by its certificate, through the tunnel.
    for name in PROXIED:
        coordinator.wait_for_log(rf"silo connected: spiffe://proxied/silo/{name}\b", 5)
    assert re.search(ROUND_WITH_ALL, silos[DIRECT].log())

    # `check` reaches the coordinator the way the agent does: through the proxy (one more
    # tunnel), and says so; a proxy that refuses the tunnel is named in a FAIL line.
    toml = tmp_path / "a.toml"
    reach = _coordinator_check(toml)
    assert reach.ok and f"through proxy {proxy.url}" in reach.detail, reach
    # (logged before the handshake could finish: the proxy relayed the hello first)
    assert [t.target for t in proxy.tunnels[len(PROXIED) :]] == [coordinator_address]
    closed = ConnectProxy(set())
    proxy_for.append(closed)
    toml.write_text(toml.read_text().replace(proxy.url, closed.url))
    reach = _coordinator_check(toml)
    assert not reach.ok and "did not open a tunnel (HTTP/1.1 403" in reach.detail, reach
    assert closed.refused == [(coordinator_address, "403 Forbidden")], closed.refused


def _coordinator_check(toml: Path) -> CheckResult:
    results = run_checks(toml, now=dt.datetime.now(dt.UTC), timeout_s=5)
    (reach,) = [r for r in results if r.name == "coordinator"]
    return reach
