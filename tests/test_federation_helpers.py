"""The e2e helpers' port choice under pytest-xdist: workers draw from disjoint slices of the
ports below the ephemeral range, so two workers never start coordinators on one port."""

from __future__ import annotations

import pytest

from tests.federation_helpers import PORTS, free_port, worker_ports


@pytest.mark.parametrize("count", [2, 3, 4])
def test_xdist_workers_draw_from_disjoint_slices_of_the_low_ports(count: int) -> None:
    slices = [set(worker_ports(f"gw{i}", str(count))) for i in range(count)]
    for i, mine in enumerate(slices):
        assert mine and mine <= set(PORTS), i
        for theirs in slices[i + 1 :]:
            assert not mine & theirs


def test_without_xdist_every_low_port_is_drawn_from() -> None:
    assert worker_ports("", "") == PORTS


def test_a_port_is_handed_out_once_per_process() -> None:
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == len(ports)
    assert all(p in worker_ports() for p in ports)
