"""The ports a local cluster's processes listen on stay out of the kernel's
ephemeral range, where outgoing connections take their source ports: a
process restarted after kill -9 (as the harness does) must find its ports
free."""

from __future__ import annotations

from pathlib import Path

import pytest

from raftkv.localcluster import make_config

pytestmark = pytest.mark.timeout(30)


def test_listening_ports_are_below_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    config = make_config(dcs=3, nodes_per_dc=2)
    ports = [p for m in config.managers for p in (m.client_port, m.raft_port)]
    ports += [p for n in config.nodes for p in (n.client_port, n.raft_port_min, n.raft_port_max)]
    assert all(p < low for p in ports), sorted(ports)
    assert len(set(ports)) == len(ports)
