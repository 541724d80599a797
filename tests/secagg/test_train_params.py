"""Training parameters: one canonical byte form, flat values only, no seed or round, and the
silo's limits; every refusal is a TrainParamsError naming what is wrong."""

from __future__ import annotations

import pytest

from secagg.train_params import (
    MAX_KEYS,
    TrainParamsError,
    TrainValue,
    canonical_train_params,
    parse_train_params,
)


def test_canonical_form_round_trips() -> None:
    params: dict[str, TrainValue] = {"lr": 0.001, "epochs": 2, "name": "héllo", "shuffle": False}
    data = canonical_train_params(params)
    assert data == b'{"epochs":2,"lr":0.001,"name":"h\\u00e9llo","shuffle":false}'
    assert parse_train_params(data, {}) == params
    assert parse_train_params(b"{}", {}) == {}


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b'{"a":1,"a":2}', "not in canonical form"),  # duplicate keys
        (b'{"lr":1e-3}', "not in canonical form"),  # a number written another way
        (b'{"lr":1e999}', "not finite"),
        (b'{"lr":NaN}', "not UTF-8 JSON"),
        (b'{"lr":Infinity}', "not UTF-8 JSON"),
        (b'{"x":[1]}', "no nesting"),
        (b'{"":1}', "must be 1..64 characters"),
        (b'{"' + b"k" * 65 + b'":1}', "must be 1..64 characters"),
        (b'{"s":"' + b"x" * 257 + b'"}', "above 256"),
        (b'"text"', "must be a JSON object"),
        (b'{"seed":1}', "training randomness"),
        (b"{} ", "not in canonical form"),
    ],
)
def test_refusals(data: bytes, why: str) -> None:
    with pytest.raises(TrainParamsError, match=why):
        parse_train_params(data, {})


def test_too_many_keys() -> None:
    data = canonical_train_params({f"k{i:03d}": i for i in range(MAX_KEYS + 1)})
    with pytest.raises(TrainParamsError, match="65 keys"):
        parse_train_params(data, {})
    parse_train_params(canonical_train_params({f"k{i:03d}": i for i in range(MAX_KEYS)}), {})


def test_limits_bound_numbers_only_for_the_keys_they_name() -> None:
    limits = {"epochs": 10.0, "lr": 0.5}
    assert parse_train_params(b'{"epochs":10,"lr":0.5,"other":99}', limits)["epochs"] == 10
    for data, why in (
        (b'{"epochs":11}', r"'epochs' = 11 is outside this silo's limit \[0, 10.0\]"),
        (b'{"epochs":-1}', "outside"),
        (b'{"lr":0.51}', "outside"),
        (b'{"epochs":true}', "must be a number"),
        (b'{"epochs":"5"}', "must be a number"),
    ):
        with pytest.raises(TrainParamsError, match=why):
            parse_train_params(data, limits)


def test_canonical_refuses_non_finite() -> None:
    with pytest.raises(ValueError):
        canonical_train_params({"lr": float("nan")})
