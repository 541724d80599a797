"""Server optimizers: each method's update against one worked out by hand, FedAvg unchanged bit for
bit, the state saved beside a checkpoint and resumed exactly, states of another method, other
hyperparameters or another model refused, and the `[server_optimizer]` table's checks."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from coordinator.config import (
    ConfigError,
    ServerOptimizerSettings,
    load_coordinator_config,
)
from coordinator.rounds.fedavg import PlaintextFedAvg
from coordinator.rounds.server_optimizer import (
    ServerOptimizer,
    ServerOptimizerError,
    ServerOptimizerState,
    ServerOptimizerStateError,
    build_server_optimizer,
)
from coordinator.storage.checkpoints import (
    CheckpointStore,
    ServerStateCorrupt,
    server_state_name,
)
from silofed.tensors import state_to_bytes
from tests.test_config import COORD, _files

State = dict[str, torch.Tensor]

# ---- the update, worked out by hand ----------------------------------------------------------

X0 = [1.0, -2.0, 0.3]
# What each round's FedAvg result moves the model by (before the server optimizer's step).
MOVES = [[0.5, -0.25, 0.1], [-0.125, 0.5, 0.0], [0.25, 0.25, -0.7]]


def by_hand(method: str, hp: Mapping[str, float]) -> list[list[float]]:
    """The model after each of 3 steps, in plain Python floats (Reddi et al. 2021, Algorithm 2;
    FedAvgM: Hsu et al. 2019), written out for one coordinate at a time."""
    x, m = list(X0), [0.0] * 3
    v = [hp.get("tau", 0.0) ** 2] * 3
    out = []
    for move in MOVES:
        fedavg = [xi + d for xi, d in zip(x, move, strict=True)]
        for i in range(3):
            delta = fedavg[i] - x[i]
            if method == "fedavg":
                x[i] = fedavg[i]
                continue
            if method == "fedavgm":
                m[i] = m[i] * hp["momentum"] + delta
                x[i] = x[i] + m[i] * hp["lr"]
                continue
            m[i] = m[i] * hp["beta1"] + delta * (1.0 - hp["beta1"])
            d2 = delta * delta
            if method == "fedadam":
                v[i] = v[i] * hp["beta2"] + d2 * (1.0 - hp["beta2"])
            elif method == "fedyogi":
                sign = (v[i] > d2) - (v[i] < d2)
                v[i] = v[i] - d2 * (1.0 - hp["beta2"]) * sign
            else:  # fedadagrad
                v[i] = v[i] + d2
            x[i] = x[i] + (m[i] * hp["lr"]) / (math.sqrt(v[i]) + hp["tau"])
        out.append(list(x))
    return out


CASES = {
    "fedavg": {},
    "fedavgm": {"lr": 0.5, "momentum": 0.8},
    "fedadam": {"lr": 0.1, "beta1": 0.8, "beta2": 0.9, "tau": 0.01},
    "fedyogi": {"lr": 0.1, "beta1": 0.8, "beta2": 0.9, "tau": 0.01},
    "fedadagrad": {"lr": 0.2, "beta1": 0.5, "tau": 0.05},
}


@pytest.mark.parametrize("method", list(CASES))
def test_each_method_matches_its_update_worked_out_by_hand(method: str) -> None:
    opt = build_server_optimizer(ServerOptimizerSettings.of(method, **CASES[method]))
    x: State = {
        "w": torch.tensor(X0, dtype=torch.float64),
        "w32": torch.tensor(X0, dtype=torch.float32),
        "bn.num_batches_tracked": torch.tensor(5, dtype=torch.int64),
    }
    state = opt.initial_state(x)
    expected = by_hand(method, CASES[method])
    for t, move in enumerate(MOVES):
        fedavg = {
            "w": x["w"] + torch.tensor(move, dtype=torch.float64),
            "w32": x["w32"] + torch.tensor(move, dtype=torch.float32),
            "bn.num_batches_tracked": torch.tensor(7 + t, dtype=torch.int64),
        }
        x, state = opt.step(x, fedavg, state)
        assert x["w"].tolist() == expected[t], (method, t)  # float64: every bit
        assert x["bn.num_batches_tracked"].item() == 7 + t  # integers take the FedAvg result
        assert state.step == t + 1
    if method != "fedavg":  # moved, and not merely by the FedAvg result
        assert x["w"].tolist() != [a + b + c + d for a, b, c, d in zip(X0, *MOVES, strict=True)]
    # float32: the same arithmetic in float64, rounded once at each step's end; by hand too.
    x32, m32 = list(X0), [0.0] * 3
    hp = CASES[method]
    v32 = [hp.get("tau", 0.0) ** 2] * 3
    for move in MOVES:
        fedavg32 = torch.tensor(x32, dtype=torch.float32) + torch.tensor(move, dtype=torch.float32)
        x64 = [float(a) for a in torch.tensor(x32, dtype=torch.float32)]
        moved = []
        for i in range(3):
            delta = float(fedavg32[i]) - x64[i]
            if method == "fedavg":
                moved.append(float(fedavg32[i]))
            elif method == "fedavgm":
                m32[i] = m32[i] * hp["momentum"] + delta
                moved.append(x64[i] + m32[i] * hp["lr"])
            else:
                m32[i] = m32[i] * hp["beta1"] + delta * (1.0 - hp["beta1"])
                d2 = delta * delta
                if method == "fedadam":
                    v32[i] = v32[i] * hp["beta2"] + d2 * (1.0 - hp["beta2"])
                elif method == "fedyogi":
                    v32[i] -= d2 * (1.0 - hp["beta2"]) * ((v32[i] > d2) - (v32[i] < d2))
                else:
                    v32[i] += d2
                moved.append(x64[i] + (m32[i] * hp["lr"]) / (math.sqrt(v32[i]) + hp["tau"]))
        x32 = [float(a) for a in torch.tensor(moved, dtype=torch.float32)]
    assert x["w32"].dtype == torch.float32 and x["w32"].tolist() == x32


def test_fedadam_first_step_with_the_numbers_written_out() -> None:
    # Δ = 0.5, β1 = 0.9, β2 = 0.99, τ = 1e-3, η = 0.01 (the defaults) from x = 1:
    # m = 0.1·0.5 = 0.05; v = 0.99·1e-6 + 0.01·0.25 = 0.00250099; √v ≈ 0.0500099
    # x' = 1 + 0.0005 / 0.0510099 ≈ 1.00980202: a step of almost η·sign(Δ) = 0.01.
    opt = build_server_optimizer(ServerOptimizerSettings.of("fedadam"))
    x = {"w": torch.tensor([1.0], dtype=torch.float64)}
    new, state = opt.step(x, {"w": torch.tensor([1.5], dtype=torch.float64)}, opt.initial_state(x))
    assert new["w"].item() == pytest.approx(1.00980202, abs=1e-8)
    assert state.m["w"].item() == pytest.approx(0.05)
    assert state.v["w"].item() == pytest.approx(0.00250099)
    assert x["w"].item() == 1.0  # the inputs are not changed


# ---- FedAvg is today's result ----------------------------------------------------------------


def small_model_state(seed: int) -> State:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fedavg_returns_the_fedavg_result_bit_for_bit(tmp_path: Path) -> None:
    old = small_model_state(0)
    agg = PlaintextFedAvg()
    agg.begin(old)
    for silo, n in (("a", 3), ("b", 5)):
        delta = small_model_state(n)
        agg.contribute(silo, n, {k: delta[k] - old[k] for k in old})
    fedavg = agg.finish().new_state
    opt = build_server_optimizer(load_config(None, tmp_path))  # no table
    assert opt.method == "fedavg"
    new, state = opt.step(old, fedavg, opt.initial_state(old))
    assert list(new) == list(old)  # the model's own tensor order (secure rounds rely on it)
    assert state_to_bytes(new) == state_to_bytes(fedavg)
    assert all(new[k] is fedavg[k] for k in new)  # nothing recomputed
    assert state.to_saved().tensors == {}


# ---- saved beside the checkpoint, resumed exactly ---------------------------------------------


def fedavg_result(x: Mapping[str, torch.Tensor], t: int) -> State:
    """A deterministic stand-in for round t's FedAvg result: part way to a target, plus noise."""
    out: State = {}
    for k, v in x.items():
        # Seeded per tensor name: a checkpoint lists its tensors in another order than the model.
        g = torch.Generator().manual_seed(100 * t + sorted(x).index(k))
        if v.dtype.is_floating_point:
            target = torch.ones_like(v)
            out[k] = v + 0.3 * (target - v) + 0.05 * torch.randn(v.shape, generator=g).to(v.dtype)
        else:
            out[k] = v + 1
    return out


def run(opt: ServerOptimizer, x: State, state: ServerOptimizerState, rounds: range) -> State:
    for t in rounds:
        x, state = opt.step(x, fedavg_result(x, t), state)
    return x


@pytest.mark.parametrize("method", list(CASES))
def test_a_restarted_optimizer_continues_exactly_as_an_uninterrupted_one(
    tmp_path: Path, method: str
) -> None:
    settings = ServerOptimizerSettings.of(method, **CASES[method])
    start = small_model_state(1)
    straight = ServerOptimizer(settings)
    final = run(straight, start, straight.initial_state(start), range(6))

    first = ServerOptimizer(settings)
    x, state = start, first.initial_state(start)
    for t in range(3):
        x, state = first.step(x, fedavg_result(x, t), state)
    store = CheckpointStore(tmp_path / "checkpoints")
    ckpt = store.save(3, x)
    saved = store.save_server_state(3, state.to_saved(), model_sha256=ckpt.sha256)
    assert saved.path.name == "round-000003.server-opt.safetensors" == server_state_name(3)
    assert saved.path.parent == ckpt.path.parent
    assert os.stat(saved.path).st_mode & 0o777 == 0o600

    # A new process: the model from its checkpoint, the state saved with it.
    again = build_server_optimizer(settings)
    model = store.load(ckpt.path, ckpt.sha256)
    loaded = store.load_server_state(3, ckpt.sha256)
    assert loaded is not None and loaded.source == str(saved.path)
    resumed_state = again.restore(loaded, model)
    assert resumed_state.step == 3
    resumed = run(again, model, resumed_state, range(3, 6))
    assert state_to_bytes(resumed) == state_to_bytes(final)
    if method != "fedavg":  # the saved moments mattered: a fresh state ends elsewhere
        fresh = run(again, model, again.initial_state(model), range(3, 6))
        assert state_to_bytes(fresh) != state_to_bytes(final)


def test_no_state_saved_with_a_checkpoint_starts_the_optimizer_afresh(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    x = small_model_state(2)
    ckpt = store.save(4, x)
    assert store.load_server_state(4, ckpt.sha256) is None
    opt = build_server_optimizer(ServerOptimizerSettings.of("fedyogi"))
    state = opt.restore(None, x)
    assert state.step == 0 and all(bool((t == 1e-6).all()) for t in state.v.values())


# ---- refusals ---------------------------------------------------------------------------------


def saved_state(tmp_path: Path, settings: ServerOptimizerSettings) -> tuple[CheckpointStore, str]:
    store = CheckpointStore(tmp_path)
    x = small_model_state(3)
    opt = ServerOptimizer(settings)
    _, state = opt.step(x, fedavg_result(x, 0), opt.initial_state(x))
    ckpt = store.save(2, x)
    store.save_server_state(2, state.to_saved(), model_sha256=ckpt.sha256)
    return store, ckpt.sha256


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (
            ServerOptimizerSettings.of("fedyogi"),
            r"was made by fedadam \(beta1=0\.9, beta2=0\.99, lr=0\.01, tau=0\.001\), but "
            r"\[server_optimizer\] now asks for fedyogi \(beta1=0\.9, beta2=0\.99, lr=0\.01, "
            r"tau=0\.001\); set \[server_optimizer\] back as it was, or move the state file away",
        ),
        (
            ServerOptimizerSettings.of("fedadam", lr=0.02),
            r"made by fedadam \(.*lr=0\.01.*\), but .* asks for fedadam \(.*lr=0\.02.*\)",
        ),
        (ServerOptimizerSettings(), r"was made by fedadam .* now asks for fedavg;"),
    ],
)
def test_a_state_of_another_method_or_hyperparameters_is_refused(
    tmp_path: Path, now: ServerOptimizerSettings, expected: str
) -> None:
    store, sha = saved_state(tmp_path, ServerOptimizerSettings.of("fedadam"))
    loaded = store.load_server_state(2, sha)
    with pytest.raises(ServerOptimizerStateError, match=expected) as info:
        ServerOptimizer(now).restore(loaded, small_model_state(3))
    assert "round-000002.server-opt.safetensors" in str(info.value)


def test_a_state_made_for_another_model_layout_is_refused(tmp_path: Path) -> None:
    settings = ServerOptimizerSettings.of("fedavgm")
    store, sha = saved_state(tmp_path, settings)
    loaded = store.load_server_state(2, sha)
    opt = ServerOptimizer(settings)
    wider = small_model_state(3)
    wider["0.weight"] = torch.zeros(4, 6)
    with pytest.raises(ServerOptimizerStateError, match=r"another model: tensor '0\.weight'"):
        opt.restore(loaded, wider)
    extra = {**small_model_state(3), "head.bias": torch.zeros(2)}
    with pytest.raises(ServerOptimizerStateError, match=r"tensors missing from it \['head\.bias'"):
        opt.restore(loaded, extra)


def test_step_refuses_a_state_of_another_optimizer_and_a_mismatched_result() -> None:
    x = small_model_state(4)
    adam = ServerOptimizer(ServerOptimizerSettings.of("fedadam"))
    yogi = ServerOptimizer(ServerOptimizerSettings.of("fedyogi"))
    with pytest.raises(ServerOptimizerStateError, match="not by fedyogi"):
        yogi.step(x, fedavg_result(x, 0), adam.initial_state(x))
    bad = fedavg_result(x, 0)
    bad["1.weight"] = bad["1.weight"].to(torch.float64)
    with pytest.raises(ServerOptimizerError, match=r"tensor '1\.weight' is float64"):
        adam.step(x, bad, adam.initial_state(x))


def test_a_step_to_a_non_finite_model_is_refused_and_changes_nothing() -> None:
    opt = ServerOptimizer(ServerOptimizerSettings.of("fedavgm", lr=1e6, momentum=0.5))
    x = {"w": torch.tensor([1.0, 2.0], dtype=torch.float16)}
    state = opt.initial_state(x)
    with pytest.raises(ServerOptimizerError, match="NON_FINITE_MODEL: tensor 'w'.*float16"):
        opt.step(x, {"w": torch.tensor([2.0, 2.0], dtype=torch.float16)}, state)
    assert x["w"].tolist() == [1.0, 2.0] and state.m["w"].tolist() == [0.0, 0.0]


def test_a_state_saved_with_another_model_is_refused(tmp_path: Path) -> None:
    store, sha = saved_state(tmp_path, ServerOptimizerSettings.of("fedadam"))
    other = "ab" * 32
    with pytest.raises(ServerStateCorrupt, match=f"saved with model {sha[:12]}, but round 2's"):
        store.load_server_state(2, other)


def test_an_altered_state_file_is_refused(tmp_path: Path) -> None:
    store, sha = saved_state(tmp_path, ServerOptimizerSettings.of("fedadam"))
    path = tmp_path / server_state_name(2)
    original = path.read_bytes()
    flipped = bytearray(original)
    flipped[-3] ^= 0x01  # one bit of a moment
    path.write_bytes(bytes(flipped))
    with pytest.raises(ServerStateCorrupt, match="does not match its own digest"):
        store.load_server_state(2, sha)
    # A header rewritten (here: the step count) with the tensors intact is refused too.
    path.write_bytes(original)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    meta["silofed.header"] = meta["silofed.header"].replace('"step": 1', '"step": 9')
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ServerStateCorrupt, match="does not match its own digest"):
        store.load_server_state(2, sha)
    path.write_bytes(b"not a state")
    with pytest.raises(ServerStateCorrupt, match="not a silofed server optimizer state"):
        store.load_server_state(2, sha)


# ---- [server_optimizer] in coordinator.toml -----------------------------------------------------


def load_config(table: str | None, tmp_path: Path) -> ServerOptimizerSettings:
    """The settings read from a coordinator.toml with `table` as its [server_optimizer] (None:
    no such table)."""
    _files(tmp_path)
    path = tmp_path / "c.toml"
    path.write_text(COORD + ("" if table is None else f"\n[server_optimizer]\n{table}\n"))
    return load_coordinator_config(path).server_optimizer


def refused(tmp_path: Path, table: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(table, tmp_path)
    prefix = f"{tmp_path / 'c.toml'}: "
    assert all(line.startswith(prefix) for line in info.value.problems)
    return [line.removeprefix(prefix) for line in info.value.problems]


def test_the_table_reads_the_method_and_fills_in_its_defaults(tmp_path: Path) -> None:
    s = load_config('method = "fedadam"\nlr = 0.05', tmp_path)
    assert (s.method, dict(s.params)) == (
        "fedadam",
        {"beta1": 0.9, "beta2": 0.99, "lr": 0.05, "tau": 0.001},
    )
    s = load_config('method = "fedavgm"\nmomentum = 0', tmp_path)
    assert dict(s.params) == {"lr": 1.0, "momentum": 0.0}
    assert load_config('method = "fedadagrad"\ntau = 1', tmp_path).param("tau") == 1.0
    assert load_config("", tmp_path) == ServerOptimizerSettings()  # method defaults to fedavg


@pytest.mark.parametrize(
    ("table", "problems"),
    [
        (
            'method = "fedadam"\nbeta_1 = 0.9',
            [
                "[server_optimizer] beta_1 is not a known key of [server_optimizer]; "
                "did you mean 'beta1'?"
            ],
        ),
        (
            'method = "fedadam"\nmomentum = 0.9',
            [
                "[server_optimizer] momentum is not used by method = 'fedadam' (it uses beta1, "
                "beta2, lr, tau); delete the line"
            ],
        ),
        (
            "lr = 0.5",
            [
                "[server_optimizer] lr is not used by method = 'fedavg' (it takes no keys); "
                "delete the line"
            ],
        ),
        (
            'method = "fedadagrad"\nbeta2 = 0.9',
            [
                "[server_optimizer] beta2 is not used by method = 'fedadagrad' (it uses beta1, lr, "
                "tau); delete the line"
            ],
        ),
        (
            'method = "fedyogi"\nbeta1 = 1.0\nbeta2 = -0.1\ntau = 0\nlr = inf',
            [
                "[server_optimizer] lr must be a finite number, got inf",
                "[server_optimizer] beta1 must be in [0, 1), got 1",
                "[server_optimizer] beta2 must be in [0, 1), got -0.1",
                "[server_optimizer] tau must be > 0, got 0",
            ],
        ),
        (
            'method = "fedavgm"\nmomentum = nan',
            ["[server_optimizer] momentum must be a finite number, got nan"],
        ),
        (
            'method = "FedAdam"',
            [
                "[server_optimizer] method must be one of ['fedavg', 'fedavgm', 'fedadam', "
                "'fedyogi', 'fedadagrad'], got 'FedAdam'"
            ],
        ),
        ('method = "fedadam"\nlr = "0.1"', ["[server_optimizer] lr must be float, got str"]),
    ],
)
def test_the_table_s_refusals_name_the_key_and_the_fix(
    tmp_path: Path, table: str, problems: list[str]
) -> None:
    assert sorted(refused(tmp_path, table)) == sorted(problems)


def test_settings_built_in_code_are_checked_like_the_file() -> None:
    check: Callable[[], object]
    for check, message in (
        (lambda: ServerOptimizerSettings.of("fedadam", momentum=0.5), "does not use"),
        (lambda: ServerOptimizerSettings.of("adam"), "must be one of"),
        (lambda: ServerOptimizerSettings.of("fedyogi", beta2=1.0), "beta2 must be in"),
        (lambda: ServerOptimizerSettings("fedavgm", (("lr", 1.0),)), "takes exactly"),
    ):
        with pytest.raises(ValueError, match=message):
            check()
