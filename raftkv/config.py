"""Cluster configuration: nodes, data centers, physical shards, keyspaces.

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

from raftkv.replication.replica import RaftSettings

CONFIG_NAME = "cluster.json"
SECRET_NAME = "secret"  # noqa: S105 - a file name, not a secret


class ConfigError(Exception):
    """The cluster configuration is missing or invalid (the message says what)."""


@dataclass(frozen=True)
class NodeConfig:
    id: str
    dc: str
    host: str
    client_port: int

    @property
    def client_address(self) -> str:
        return f"{self.host}:{self.client_port}"


@dataclass(frozen=True)
class ReplicaConfig:
    node: str
    raft_port: int


@dataclass(frozen=True)
class ShardConfig:
    id: int
    replicas: tuple[ReplicaConfig, ...]


@dataclass(frozen=True)
class KeyspaceConfig:
    name: str
    id: int
    logical_shards: int = 256


@dataclass(frozen=True)
class ClusterConfig:
    nodes: tuple[NodeConfig, ...]
    shards: tuple[ShardConfig, ...]
    keyspaces: tuple[KeyspaceConfig, ...] = (KeyspaceConfig("default", 0),)
    raft: RaftSettings = field(default_factory=RaftSettings)

    def node(self, node_id: str) -> NodeConfig:
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise ConfigError(f"no node {node_id!r} in the cluster config")

    def keyspace(self, name: str) -> KeyspaceConfig | None:
        for ks in self.keyspaces:
            if ks.name == name:
                return ks
        return None

    def raft_address(self, shard: ShardConfig, replica: ReplicaConfig) -> str:
        return f"{self.node(replica.node).host}:{replica.raft_port}"

    def client_address_by_raft_address(self) -> dict[str, str]:
        """Raft address of every replica -> client address of its node."""
        return {
            self.raft_address(shard, r): self.node(r.node).client_address
            for shard in self.shards
            for r in shard.replicas
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "nodes": [asdict(n) for n in self.nodes],
            "shards": [
                {"id": s.id, "replicas": [asdict(r) for r in s.replicas]} for s in self.shards
            ],
            "keyspaces": [asdict(k) for k in self.keyspaces],
            "raft": asdict(self.raft),
        }

    @classmethod
    def from_json(cls, data: Any) -> ClusterConfig:
        try:
            nodes = tuple(NodeConfig(**n) for n in data["nodes"])
            shards = tuple(
                ShardConfig(int(s["id"]), tuple(ReplicaConfig(**r) for r in s["replicas"]))
                for s in data["shards"]
            )
            keyspaces = tuple(KeyspaceConfig(**k) for k in data.get("keyspaces", []))
            raft = RaftSettings(**data.get("raft", {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"invalid cluster config: {exc}") from exc
        config = cls(nodes, shards, keyspaces or (KeyspaceConfig("default", 0),), raft)
        ids = [n.id for n in nodes]
        if len(set(ids)) != len(ids):
            raise ConfigError("node ids must be unique")
        for shard in shards:
            for replica in shard.replicas:
                config.node(replica.node)
        return config


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
    return ClusterConfig.from_json(data), secret


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
