"""TOML configuration: valid files load; every bad key is refused naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.config import ConfigError as CoordinatorConfigError
from coordinator.config import load_coordinator_config
from silo_agent.config import ConfigError as SiloConfigError
from silo_agent.config import load_silo_config


def _files(tmp: Path) -> dict[str, Path]:
    names = ["ca.pem", "c.pem", "c.key", "roster.json", "s.pem", "s.key"]
    for name in names:
        (tmp / name).write_text("x")
    return {n: tmp / n for n in names}


COORD = """
[federation]
id = "fed"
state_dir = "state"
[server]
listen = "127.0.0.1:0"
[tls]
ca_cert = "ca.pem"
cert = "c.pem"
key = "c.key"
roster = "roster.json"
revoked = "revoked.json"
[task]
spec = "examples.hospital.task:TASK"
[rounds]
count = 3
min_silos = 2
aggregation = "plaintext-insecure"
[deadlines]
offer_s = 5
train_s = 7.5
[train]
epochs = 2
lr = 0.1
"""

SILO = """
[silo]
name = "a"
state_dir = "silo-state"
[coordinator]
address = "127.0.0.1:5000"
server_name = "localhost"
[tls]
ca_cert = "ca.pem"
cert = "s.pem"
key = "s.key"
roster = "roster.json"
[task]
spec = "examples.hospital.task:TASK"
[task.options]
silo_index = 1
[reconnect]
initial_s = 0.1
max_s = 4
"""


def test_coordinator_config_loads_and_resolves_paths(tmp_path: Path) -> None:
    _files(tmp_path)
    path = tmp_path / "c.toml"
    path.write_text(COORD)
    cfg = load_coordinator_config(path)
    assert cfg.federation_id == "fed"
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.tls.revoked == tmp_path / "revoked.json"
    assert (cfg.host, cfg.port) == ("127.0.0.1", 0)
    assert cfg.rounds.count == 3 and cfg.rounds.aggregation == "plaintext-insecure"
    assert cfg.deadlines.offer_s == 5.0 and cfg.deadlines.train_s == 7.5
    assert dict(cfg.train) == {"epochs": 2, "lr": 0.1}


def test_silo_config_loads(tmp_path: Path) -> None:
    _files(tmp_path)
    path = tmp_path / "s.toml"
    path.write_text(SILO)
    cfg = load_silo_config(path)
    assert cfg.name == "a" and cfg.address == "127.0.0.1:5000"
    assert dict(cfg.task_options) == {"silo_index": 1}
    assert cfg.reconnect.initial_s == 0.1 and cfg.reconnect.max_s == 4.0
    assert cfg.tls.key == tmp_path / "s.key"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("count = 3", 'count = "3"', r"\[rounds\] count must be int, got str"),
        ("count = 3", "count = 0", r"\[rounds\] count must be > 0"),
        (
            'aggregation = "plaintext-insecure"',
            'aggregation = "fedavg"',
            r"\[rounds\] aggregation must be one of",
        ),
        (
            'aggregation = "plaintext-insecure"',
            'aggregation = "plaintext"',
            r"\[rounds\] aggregation 'plaintext' is refused: .*IN THE CLEAR.*insecure.*"
            r"name it 'plaintext-insecure'",
        ),
        ('listen = "127.0.0.1:0"', 'listen = "localhost"', r"\[server\] listen must be host:port"),
        (
            'cert = "c.pem"',
            'cert = "missing.pem"',
            r"\[tls\] cert names .*missing.pem, which does not exist",
        ),
        (
            'spec = "examples.hospital.task:TASK"',
            'spec = "nocolon"',
            r"\[task\] spec must look like",
        ),
        ('id = "fed"', 'id = "a/b"', r"\[federation\] id must be a non-empty name"),
        ("train_s = 7.5", "train_s = -1", r"\[deadlines\] train_s must be > 0"),
        ("[train]", "[trian]", r"\[trian\] is not a known table; did you mean \[train\]\?"),
        (
            "min_silos = 2",
            "min_silos = 2\nsilos_per_round = 1",
            r"\[rounds\] silos_per_round must be >= min_silos",
        ),
        ('[server]\nlisten = "127.0.0.1:0"', "", r"\[server\] table is missing"),
    ],
)
def test_coordinator_errors_name_file_and_key(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    _files(tmp_path)
    path = tmp_path / "c.toml"
    assert old in COORD
    path.write_text(COORD.replace(old, new))
    with pytest.raises(CoordinatorConfigError, match=message) as info:
        load_coordinator_config(path)
    assert str(info.value).startswith(str(path))


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('name = "a"', "", r"\[silo\] name is missing"),
        ('name = "a"', 'id = "a"', r"\[silo\] id must be a spiffe:// URI"),
        (
            'address = "127.0.0.1:5000"',
            'address = "127.0.0.1:0"',
            r"needs the coordinator's real port",
        ),
        ("initial_s = 0.1", "initial_s = 9", r"\[reconnect\] initial_s must be <= max_s"),
        ('roster = "roster.json"', 'roster = ""', r"\[tls\] roster is empty"),
        (
            "silo_index = 1",
            "silo_index = 1\n[surplus]",
            r"\[surplus\] is not a known table \(known: \[coordinator\], \[debug\]",
        ),
    ],
)
def test_silo_errors_name_file_and_key(tmp_path: Path, old: str, new: str, message: str) -> None:
    _files(tmp_path)
    path = tmp_path / "s.toml"
    assert old in SILO
    path.write_text(SILO.replace(old, new))
    with pytest.raises(SiloConfigError, match=message) as info:
        load_silo_config(path)
    assert str(info.value).startswith(str(path))


def test_missing_and_unparsable_files(tmp_path: Path) -> None:
    with pytest.raises(CoordinatorConfigError, match="configuration file not found"):
        load_coordinator_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation\nid=")
    with pytest.raises(SiloConfigError, match="not valid TOML"):
        load_silo_config(bad)


def test_reconnect_backoff_is_exponential_with_full_jitter_and_capped() -> None:
    from silo_agent.runtime.backoff import Backoff

    draws = iter([1.0 - 1e-9, 0.5, 1.0 - 1e-9, 1.0 - 1e-9, 1.0 - 1e-9, 0.0])
    b = Backoff(initial_s=0.5, max_s=3.0, rng=lambda: next(draws))
    delays = [b.next_delay() for _ in range(6)]
    ceilings = [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert all(0.0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert delays[0] == pytest.approx(0.5) and delays[1] == pytest.approx(0.5)
    assert delays[3] == pytest.approx(3.0) and delays[5] == 0.0
    b.reset()
    assert b.ceiling() == 0.5
    with pytest.raises(ValueError):
        Backoff(initial_s=2.0, max_s=1.0, rng=lambda: 0.0)


SECURE = (
    COORD.replace('aggregation = "plaintext-insecure"\n', "").replace(
        "min_silos = 2", "min_silos = 3"
    )
    + "\n[secagg]\nclip_l2 = 10.0\n"
)


def test_secure_aggregation_is_the_default_and_reads_secagg(tmp_path: Path) -> None:
    _files(tmp_path)
    path = tmp_path / "c.toml"
    path.write_text(SECURE + 'threshold = 3\nweighting = "uniform"\nnoise_multiplier = 0.5\n')
    cfg = load_coordinator_config(path)
    assert cfg.rounds.aggregation == "secagg"
    assert cfg.secagg is not None
    assert (cfg.secagg.clip_l2, cfg.secagg.threshold, cfg.secagg.ring_bits) == (10.0, 3, 32)
    assert cfg.secagg.weighting.value == "uniform" and cfg.secagg.dp_noise_multiplier == 0.5
    # unset: chosen from the masked vector's size (tests/test_upload_slots.py)
    assert cfg.max_concurrent_uploads is None and cfg.deadlines.unmask_s == 60.0


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("clip_l2 = 10.0", "", r"\[secagg\] clip_l2 is missing: secure aggregation clips"),
        ("clip_l2 = 10.0", "clip_l2 = -1.0", r"\[secagg\] clip_l2 must be > 0"),
        (
            "clip_l2 = 10.0",
            "clip_l2 = 1.0\nclip = 2",
            r"\[secagg\] clip is not a known key of \[secagg\]; did you mean 'clip_l2'\?",
        ),
        (
            "clip_l2 = 10.0",
            "clip_l2 = 1.0\nring_bits = 16",
            r"\[secagg\] ring_bits must be 32 or 64",
        ),
        ("clip_l2 = 10.0", "clip_l2 = 1.0\nthreshold = 2", r"\[secagg\] threshold must be >= 3"),
        (
            "clip_l2 = 10.0",
            'clip_l2 = 1.0\nweighting = "size"',
            r"\[secagg\] weighting must be one of \['examples', 'uniform'\]",
        ),
        ("min_silos = 3", "min_silos = 2", r"\[rounds\] min_silos must be >= 3 with secure"),
    ],
)
def test_secagg_errors_name_file_and_key(tmp_path: Path, old: str, new: str, message: str) -> None:
    _files(tmp_path)
    path = tmp_path / "c.toml"
    assert old in SECURE
    path.write_text(SECURE.replace(old, new))
    with pytest.raises(CoordinatorConfigError, match=message) as info:
        load_coordinator_config(path)
    assert str(info.value).startswith(str(path))


def test_the_sparse_graph_keys_are_read(tmp_path: Path) -> None:
    from coordinator.config import GraphMode

    _files(tmp_path)
    path = tmp_path / "c.toml"
    path.write_text(SECURE)
    s = load_coordinator_config(path).secagg
    assert s is not None and s.graph is GraphMode.COMPLETE and s.graph_degree is None
    path.write_text(SECURE + 'graph = "harary"\n')
    s = load_coordinator_config(path).secagg
    assert s is not None and s.graph is GraphMode.HARARY
    assert (s.graph_degree, s.dropout_rate) == (None, 0.05)  # the rule's degree, δ = 0.05
    path.write_text(SECURE + 'graph = "harary"\ndropout_rate = 0.1\n')
    s = load_coordinator_config(path).secagg
    assert s is not None and (s.graph_degree, s.dropout_rate) == (None, 0.1)
    path.write_text(SECURE + 'graph = "harary"\ngraph_degree = 6\nn_colluders = 5\n')
    s = load_coordinator_config(path).secagg
    assert s is not None and s.graph_degree == 6


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('graph = "ring"', r"\[secagg\] graph must be one of \['complete', 'harary'\]"),
        ('graph = "harary"\ngraph_degree = 5', r"\[secagg\] graph_degree must be an even number"),
        ('graph = "harary"\ngraph_degree = 0', r"\[secagg\] graph_degree must be an even number"),
        ("graph_degree = 6", r'\[secagg\] graph_degree is used only with graph = "harary"'),
        ("dropout_rate = 0.1", r'\[secagg\] dropout_rate is used only with graph = "harary"'),
        ('graph = "harary"\ndropout_rate = 1.0', r"\[secagg\] dropout_rate must be in \[0, 1\)"),
        ('graph = "harary"\ndropout_rate = -0.1', r"\[secagg\] dropout_rate must be in \[0, 1\)"),
        (
            'graph = "harary"\ngraph_degree = 6\ndropout_rate = 0.1',
            r"\[secagg\] dropout_rate is not used when graph_degree is set",
        ),
        (
            'graph = "harary"\ngraph_degree = 4\nn_colluders = 4',
            r"\[secagg\] graph_degree must be at least 6 \(an even number above n_colluders = 4",
        ),
        ('graph = "harary"\ngraph_degree = 4\nn_colluders = 3', None),  # 4 > 3: accepted
    ],
)
def test_sparse_graph_key_errors_name_the_key(
    tmp_path: Path, extra: str, message: str | None
) -> None:
    _files(tmp_path)
    path = tmp_path / "c.toml"
    path.write_text(SECURE + extra + "\n")
    if message is None:
        assert load_coordinator_config(path).secagg is not None
        return
    with pytest.raises(CoordinatorConfigError, match=message):
        load_coordinator_config(path)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[debug]\npause_after_phase = "train"', r"\[debug\] pause_after_phase must be one of"),
        ("[secagg]\nt_floor = 2", r"\[secagg\] t_floor must be >= 3"),
        ('[secagg]\nallow_plaintext_insecure = "yes"', r"allow_plaintext_insecure must be bool"),
        ("[secagg]\nremembered_models = 0", r"\[secagg\] remembered_models must be"),
    ],
)
def test_silo_secagg_and_debug_errors(tmp_path: Path, extra: str, message: str) -> None:
    _files(tmp_path)
    path = tmp_path / "s.toml"
    path.write_text(SILO + "\n" + extra + "\n")
    with pytest.raises(SiloConfigError, match=message):
        load_silo_config(path)


def test_silo_declines_plaintext_unless_allowed(tmp_path: Path) -> None:
    _files(tmp_path)
    path = tmp_path / "s.toml"
    path.write_text(SILO)
    assert load_silo_config(path).secagg.allow_plaintext_insecure is False
    path.write_text(SILO + "\n[secagg]\nallow_plaintext_insecure = true\n")
    assert load_silo_config(path).secagg.allow_plaintext_insecure is True


def test_silo_takes_example_weighted_rounds_unless_refused(tmp_path: Path) -> None:
    _files(tmp_path)
    path = tmp_path / "s.toml"
    path.write_text(SILO)
    assert load_silo_config(path).secagg.allow_example_weighting is False
    path.write_text(SILO + "\n[secagg]\nallow_example_weighting = true\n")
    assert load_silo_config(path).secagg.allow_example_weighting is True
    path.write_text(SILO + '\n[secagg]\nallow_example_weighting = "no"\n')
    with pytest.raises(SiloConfigError, match=r"\[secagg\] allow_example_weighting must be bool"):
        load_silo_config(path)


def test_silo_remembers_64_models_unless_told(tmp_path: Path) -> None:
    _files(tmp_path)
    path = tmp_path / "s.toml"
    path.write_text(SILO)
    assert load_silo_config(path).secagg.remembered_models == 64
    path.write_text(SILO + "\n[secagg]\nremembered_models = 500\n")
    assert load_silo_config(path).secagg.remembered_models == 500
