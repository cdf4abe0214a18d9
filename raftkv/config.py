"""Cluster configuration: the shard manager's replicas and the storage nodes.

Stored as ``cluster.json`` (documented in the README); the cluster secret that
keys Raft encryption lives beside it in ``secret`` (mode 0600) and never in
the JSON. Every address is explicit, so nodes may run on different hosts.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raftkv.replication.settings import RaftSettings

CONFIG_NAME = "cluster.json"
SECRET_NAME = "secret"  # noqa: S105 - a file name, not a secret


class ConfigError(Exception):
    """The cluster configuration is missing or invalid (the message says what)."""


@dataclass(frozen=True)
class NodeConfig:
    """A storage node: serves clients on ``client_port`` and lends the Raft ports
    ``raft_port_min..raft_port_max`` of ``host`` to the replicas the shard
    manager places on it."""

    id: str
    dc: str
    host: str
    client_port: int
    raft_port_min: int
    raft_port_max: int
    capacity: int = 1

    @property
    def client_address(self) -> str:
        return f"{self.host}:{self.client_port}"


@dataclass(frozen=True)
class ManagerConfig:
    """One replica of the shard manager's own Raft group."""

    id: str
    dc: str
    host: str
    client_port: int
    raft_port: int

    @property
    def client_address(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def raft_address(self) -> str:
        return f"{self.host}:{self.raft_port}"


@dataclass(frozen=True)
class KeyspaceDefaults:
    """What ``raftkv up`` creates as keyspace ``default``, and the defaults of
    ``raftkv keyspace create``."""

    logical_shards: int = 256
    physical_shards: int = 1
    replication_factor: int = 3


@dataclass(frozen=True)
class ClusterConfig:
    managers: tuple[ManagerConfig, ...]
    nodes: tuple[NodeConfig, ...]
    raft: RaftSettings = field(default_factory=RaftSettings)
    keyspace_defaults: KeyspaceDefaults = field(default_factory=KeyspaceDefaults)
    inter_dc_latency_ms: float = 0.0

    def node(self, node_id: str) -> NodeConfig:
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise ConfigError(f"no node {node_id!r} in the cluster config")

    def manager(self, manager_id: str) -> ManagerConfig:
        for manager in self.managers:
            if manager.id == manager_id:
                return manager
        raise ConfigError(f"no shard manager {manager_id!r} in the cluster config")

    @property
    def manager_addresses(self) -> list[str]:
        return [m.client_address for m in self.managers]

    def process_of_raft_address(self, address: str) -> tuple[str, str] | None:
        """(process id, data center) of whoever owns a Raft address, if known."""
        host, _, port_text = address.rpartition(":")
        try:
            port = int(port_text)
        except ValueError:
            return None
        for m in self.managers:
            if m.host == host and m.raft_port == port:
                return m.id, m.dc
        for n in self.nodes:
            if n.host == host and n.raft_port_min <= port <= n.raft_port_max:
                return n.id, n.dc
        return None

    def hub_address_of(self, raft_address: str) -> str | None:
        """Where the process owning a Raft address accepts Raft traffic (its
        ``RaftHub``): a node's first Raft port (its other Raft ports are only
        names of the group members it hosts), a shard manager's Raft port."""
        owner = self.process_of_raft_address(raft_address)
        if owner is None:
            return None
        for m in self.managers:
            if m.id == owner[0]:
                return m.raft_address
        node = self.node(owner[0])
        return f"{node.host}:{node.raft_port_min}"

    def dc_of(self, process_id: str) -> str:
        dcs = {m.id: m.dc for m in self.managers} | {n.id: n.dc for n in self.nodes}
        if process_id not in dcs:
            raise ConfigError(f"no node or shard manager {process_id!r} in the cluster config")
        return dcs[process_id]

    @property
    def process_ids(self) -> list[str]:
        return [m.id for m in self.managers] + [n.id for n in self.nodes]

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 2,
            "managers": [asdict(m) for m in self.managers],
            "nodes": [asdict(n) for n in self.nodes],
            "raft": asdict(self.raft),
            "keyspace_defaults": asdict(self.keyspace_defaults),
            "inter_dc_latency_ms": self.inter_dc_latency_ms,
        }

    @classmethod
    def from_json(cls, data: Any) -> ClusterConfig:
        try:
            if data.get("version") != 2:
                raise ConfigError(f"cluster config version {data.get('version')!r} is not "
                                  "supported (expected 2)")
            managers = tuple(ManagerConfig(**m) for m in data["managers"])
            nodes = tuple(NodeConfig(**n) for n in data["nodes"])
            raft = RaftSettings(**data.get("raft", {}))
            defaults = KeyspaceDefaults(**data.get("keyspace_defaults", {}))
            latency = float(data.get("inter_dc_latency_ms", 0.0))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"invalid cluster config: {exc}") from exc
        ids = [m.id for m in managers] + [n.id for n in nodes]
        if len(set(ids)) != len(ids):
            raise ConfigError("node and shard manager ids must be unique")
        if not managers:
            raise ConfigError("the cluster config lists no shard manager")
        if latency < 0:
            raise ConfigError("inter_dc_latency_ms must not be negative")
        for n in nodes:
            if not 0 < n.raft_port_min <= n.raft_port_max < 65536:
                raise ConfigError(f"node {n.id}: bad Raft port range")
        return cls(managers, nodes, raft, defaults, latency)


def load(directory: Path) -> tuple[ClusterConfig, str]:
    """Read ``cluster.json`` and the secret from a cluster directory."""
    path = Path(directory) / CONFIG_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no cluster at {directory} (missing {CONFIG_NAME})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from exc
    try:
        secret = (Path(directory) / SECRET_NAME).read_text().strip()
    except FileNotFoundError:
        raise ConfigError(f"no cluster secret at {directory}/{SECRET_NAME}") from None
    try:
        return ClusterConfig.from_json(data), secret
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def save(directory: Path, config: ClusterConfig, secret: str | None = None) -> str:
    """Write the config (and a new random secret unless one exists or is given)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    secret_path = directory / SECRET_NAME
    if secret is None:
        secret = (
            secret_path.read_text().strip() if secret_path.exists() else secrets.token_urlsafe(32)
        )
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    (directory / CONFIG_NAME).write_text(json.dumps(config.to_json(), indent=2) + "\n")
    return secret
