"""Server optimizers: the step from a round's FedAvg result to the next global model.

Rule: pure — tensors in, tensors out; no files, clocks or network. A server optimizer sees only
the global model x and the round's FedAvg result x̄, which secure aggregation produces without
revealing any silo's own update, so every method here works over secure aggregation. With
Δ = x̄ − x (the negative of the pseudo-gradient):

    fedavg      x' = x̄ (the FedAvg result itself, bit for bit)
    fedavgm     m = μ·m + Δ;                                 x' = x + η·m   (Hsu et al. 2019)
    fedadam     m = β1·m + (1−β1)·Δ;  v = β2·v + (1−β2)·Δ²;  x' = x + η·m / (√v + τ)
    fedyogi     m as fedadam;  v = v − (1−β2)·Δ²·sign(v − Δ²); x' as fedadam
    fedadagrad  m as fedadam;  v = v + Δ²;                     x' as fedadam

The last three are Reddi et al. 2021 ("Adaptive Federated Optimization"), Algorithm 2, with
m₋₁ = 0 and v₋₁ = τ² (the paper's v₋₁ ≥ τ²). There is no bias correction because Algorithm 2 has
none: v starts at τ², not 0, and τ bounds every coordinate's step by η·|m|/τ, so the early steps
need no rescaling; adding one would make these methods differ from the ones the paper evaluates.

Only floating-point tensors are optimized; the others (integer buffers such as BatchNorm's
num_batches_tracked) take the FedAvg result. m and v are float64 and so is the arithmetic, each
tensor rounded once to its own dtype at the end; the state is saved in float64, so a coordinator
that restarts from it continues bit for bit as one that never stopped. A step never changes its
inputs, so a caller that refuses its result keeps the old model and the old state.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from coordinator.config import CoordinatorConfig, ServerOptimizerSettings
from coordinator.rounds.secure_config import NON_FINITE_MODEL
from coordinator.storage.checkpoints import ServerState

_FORMAT = 1  # of the saved header; a state of another format is refused
_ADAPTIVE = ("fedadam", "fedyogi", "fedadagrad")


class ServerOptimizerError(ValueError):
    """The step cannot be taken (the tensors differ from the model's, or the new model is not
    finite: code NON_FINITE_MODEL); the caller keeps the old model and state. str() says why."""


class ServerOptimizerStateError(ServerOptimizerError):
    """A saved state was made for another method, other hyperparameters or another model
    layout, or is damaged; str() names it and what to do."""


# One optimized tensor: its name, the model's dtype for it, its shape.
TensorSlot = tuple[str, str, tuple[int, ...]]


def layout_of(model: Mapping[str, torch.Tensor]) -> tuple[TensorSlot, ...]:
    """The floating-point tensors of `model` (those a server optimizer moves), by name."""
    return tuple(
        (name, _dtype(t), tuple(t.shape))
        for name, t in sorted(model.items())
        if t.dtype.is_floating_point
    )


@dataclass(frozen=True, slots=True)
class ServerOptimizerState:
    """What a server optimizer carries from one round to the next: the steps taken, and its
    float64 moments by tensor name (`m`: fedavgm and the adaptive methods; `v`: the adaptive
    methods only). `settings` and `layout` say what it was made for; a state is used only by
    an optimizer with the same ones."""

    settings: ServerOptimizerSettings
    step: int
    layout: tuple[TensorSlot, ...]
    m: Mapping[str, torch.Tensor]
    v: Mapping[str, torch.Tensor]

    def header(self) -> str:
        """The small JSON header saved with the tensors (canonical: sorted keys)."""
        return json.dumps(
            {
                "format": _FORMAT,
                "method": self.settings.method,
                "hyperparameters": dict(self.settings.params),
                "step": self.step,
                "layout": [[name, dtype, list(shape)] for name, dtype, shape in self.layout],
            },
            sort_keys=True,
        )

    def to_saved(self) -> ServerState:
        """The flat form saved beside a checkpoint (CheckpointStore.save_server_state): tensors
        `m/<name>` and `v/<name>`, and the header."""
        tensors = {f"m/{name}": t for name, t in self.m.items()}
        tensors.update({f"v/{name}": t for name, t in self.v.items()})
        return ServerState(header=self.header(), tensors=tensors)


class ServerOptimizer:
    """One method with its hyperparameters (build it with `build_server_optimizer`)."""

    def __init__(self, settings: ServerOptimizerSettings) -> None:
        self.settings = settings
        self.method = settings.method

    def describe(self) -> str:
        """E.g. `fedadam (beta1=0.9, beta2=0.99, lr=0.01, tau=0.001)`, for logs and messages."""
        return _described(self.settings)

    def initial_state(self, global_state: Mapping[str, torch.Tensor]) -> ServerOptimizerState:
        """The state before the first step over `global_state`: m = 0, v = τ², no steps."""
        layout = layout_of(global_state)
        m: dict[str, torch.Tensor] = {}
        v: dict[str, torch.Tensor] = {}
        if self.method != "fedavg":
            m = {name: torch.zeros(shape, dtype=torch.float64) for name, _, shape in layout}
        if self.method in _ADAPTIVE:
            tau = self.settings.param("tau")
            v = {
                name: torch.full(shape, tau * tau, dtype=torch.float64) for name, _, shape in layout
            }
        return ServerOptimizerState(self.settings, 0, layout, m, v)

    def step(
        self,
        global_state: Mapping[str, torch.Tensor],
        fedavg_state: Mapping[str, torch.Tensor],
        state: ServerOptimizerState,
    ) -> tuple[dict[str, torch.Tensor], ServerOptimizerState]:
        """The next global model (in `global_state`'s tensor order) and the state after this
        step. Raises ServerOptimizerStateError when `state` was made for another method,
        hyperparameters or layout; ServerOptimizerError when the FedAvg result's tensors are
        not the model's, or (NON_FINITE_MODEL) when the new model or state is not finite."""
        self._check_state(state, global_state, "the given state")
        _check_same_tensors(global_state, fedavg_state)
        step = state.step + 1
        if self.method == "fedavg":
            new = {name: fedavg_state[name] for name in global_state}
            return new, ServerOptimizerState(self.settings, step, state.layout, {}, {})
        lr = self.settings.param("lr")
        new_state: dict[str, torch.Tensor] = {}
        new_m: dict[str, torch.Tensor] = {}
        new_v: dict[str, torch.Tensor] = {}
        for name, x in global_state.items():
            if not x.dtype.is_floating_point:
                new_state[name] = fedavg_state[name]
                continue
            x64 = x.to(torch.float64)
            delta = fedavg_state[name].to(torch.float64) - x64
            if self.method == "fedavgm":
                m = state.m[name] * self.settings.param("momentum") + delta
                moved = x64 + m * lr
            else:
                beta1 = self.settings.param("beta1")
                m = state.m[name] * beta1 + delta * (1.0 - beta1)
                v = _SECOND_MOMENT[self.method](state.v[name], delta * delta, self.settings)
                moved = x64 + (m * lr) / (v.sqrt() + self.settings.param("tau"))
                new_v[name] = _finite(v, name, "its second moment v")
            new_m[name] = _finite(m, name, "its first moment m")
            new_state[name] = _finite(moved.to(x.dtype), name, f"the new model ({_dtype(x)})")
        return new_state, ServerOptimizerState(self.settings, step, state.layout, new_m, new_v)

    def restore(
        self, saved: ServerState | None, global_state: Mapping[str, torch.Tensor]
    ) -> ServerOptimizerState:
        """The state saved with the checkpoint `global_state` was read from, or the initial one
        when none was saved (a federation started before server optimizers, or a state moved
        away on purpose). Raises ServerOptimizerStateError when `saved` was made for another
        method, other hyperparameters or another layout, or does not hold what its header says."""
        if saved is None:
            return self.initial_state(global_state)
        where = f"server optimizer state {saved.source or '(unsaved)'}"
        try:
            head = json.loads(saved.header)
            made_for = describe(str(head["method"]), dict(head["hyperparameters"]))
            step = head["step"]
            layout = tuple(
                (str(name), str(dtype), tuple(int(n) for n in shape))
                for name, dtype, shape in head["layout"]
            )
            fmt = head["format"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ServerOptimizerStateError(
                f"{where} has an unreadable header ({exc}); {_FIX}"
            ) from exc
        if fmt != _FORMAT or not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ServerOptimizerStateError(
                f"{where} is of format {fmt!r} at step {step!r}; this coordinator reads format "
                f"{_FORMAT}; {_FIX}"
            )
        if made_for != self.describe():
            raise ServerOptimizerStateError(
                f"{where} was made by {made_for}, but [server_optimizer] now asks for "
                f"{self.describe()}; set [server_optimizer] back as it was, or {_FIX}"
            )
        m = _moments(saved, "m/") if self.method != "fedavg" else {}
        v = _moments(saved, "v/") if self.method in _ADAPTIVE else {}
        if len(m) + len(v) != len(saved.tensors):
            raise ServerOptimizerStateError(
                f"{where} holds tensors {self.method} does not keep; {_FIX}"
            )
        state = ServerOptimizerState(self.settings, step, layout, m, v)
        self._check_state(state, global_state, where)
        return state

    def _check_state(
        self, state: ServerOptimizerState, model: Mapping[str, torch.Tensor], where: str
    ) -> None:
        if state.settings != self.settings:
            raise ServerOptimizerStateError(
                f"{where} was made by {_described(state.settings)}, not by {self.describe()}"
            )
        layout = layout_of(model)
        if state.layout != layout:
            raise ServerOptimizerStateError(
                f"{where} was made for another model: {_layout_difference(state.layout, layout)}"
                f"; {_FIX}"
            )
        names = {name for name, _, _ in layout}
        kept = {"m": self.method != "fedavg", "v": self.method in _ADAPTIVE}
        for moments, kind in ((state.m, "m"), (state.v, "v")):
            if set(moments) != (names if kept[kind] else set()):
                raise ServerOptimizerStateError(
                    f"{where}: its {kind} is not one tensor per floating-point tensor of the "
                    f"model; {_FIX}"
                )
            for name, _, shape in layout if kept[kind] else ():
                t = moments[name]
                if t.dtype != torch.float64 or tuple(t.shape) != shape:
                    raise ServerOptimizerStateError(
                        f"{where}: its {kind} for tensor {name!r} is {_dtype(t)} "
                        f"{tuple(t.shape)}, not float64 {shape}; {_FIX}"
                    )


_FIX = (
    "move the state file away to restart the server optimizer from this checkpoint's model with "
    "a fresh state (its momentum is lost)"
)


def build_server_optimizer(
    config: CoordinatorConfig | ServerOptimizerSettings,
) -> ServerOptimizer:
    """The server optimizer `[server_optimizer]` asks for (fedavg when the table is absent)."""
    settings = config.server_optimizer if isinstance(config, CoordinatorConfig) else config
    return ServerOptimizer(settings)


def describe(method: str, params: Mapping[str, float]) -> str:
    """`method (k=v, ...)`, keys sorted, values exact (repr)."""
    if not params:
        return method
    return f"{method} ({', '.join(f'{k}={params[k]!r}' for k in sorted(params))})"


def _described(settings: ServerOptimizerSettings) -> str:
    return describe(settings.method, dict(settings.params))


def _adam(v: torch.Tensor, d2: torch.Tensor, s: ServerOptimizerSettings) -> torch.Tensor:
    beta2 = s.param("beta2")
    return v * beta2 + d2 * (1.0 - beta2)


def _yogi(v: torch.Tensor, d2: torch.Tensor, s: ServerOptimizerSettings) -> torch.Tensor:
    # v moves towards Δ² by (1−β2)·Δ² at most, whatever their distance (Adam's moves by a
    # fraction of the distance): v changes slowly when Δ² jumps.
    return v - d2 * (1.0 - s.param("beta2")) * torch.sign(v - d2)


def _adagrad(v: torch.Tensor, d2: torch.Tensor, s: ServerOptimizerSettings) -> torch.Tensor:
    return v + d2


_SECOND_MOMENT: dict[
    str, Callable[[torch.Tensor, torch.Tensor, ServerOptimizerSettings], torch.Tensor]
] = {"fedadam": _adam, "fedyogi": _yogi, "fedadagrad": _adagrad}


def _check_same_tensors(
    model: Mapping[str, torch.Tensor], result: Mapping[str, torch.Tensor]
) -> None:
    if set(model) != set(result):
        raise ServerOptimizerError(
            "the FedAvg result's tensors differ from the model's: missing "
            f"{sorted(set(model) - set(result))[:3]}, "
            f"unexpected {sorted(set(result) - set(model))[:3]}"
        )
    for name, x in model.items():
        got = result[name]
        if got.dtype != x.dtype or got.shape != x.shape:
            raise ServerOptimizerError(
                f"the FedAvg result's tensor {name!r} is {_dtype(got)} {tuple(got.shape)}, the "
                f"model's is {_dtype(x)} {tuple(x.shape)}"
            )


def _finite(tensor: torch.Tensor, name: str, what: str) -> torch.Tensor:
    if not bool(torch.isfinite(tensor).all()):
        raise ServerOptimizerError(
            f"{NON_FINITE_MODEL}: tensor {name!r}: {what} is not finite after the server "
            "optimizer's step; the model is kept"
        )
    return tensor


def _moments(saved: ServerState, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: t for k, t in saved.tensors.items() if k.startswith(prefix)}


def _layout_difference(saved: tuple[TensorSlot, ...], model: tuple[TensorSlot, ...]) -> str:
    ours = {slot[0]: slot for slot in model}
    theirs = {slot[0]: slot for slot in saved}
    if set(ours) != set(theirs):
        return (
            f"tensors missing from it {sorted(set(ours) - set(theirs))[:3]}, tensors the model "
            f"does not have {sorted(set(theirs) - set(ours))[:3]}"
        )
    name = next(n for n in sorted(ours) if ours[n] != theirs[n])
    return f"tensor {name!r} is {theirs[name][1:]} in it, {ours[name][1:]} in the model"


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")
