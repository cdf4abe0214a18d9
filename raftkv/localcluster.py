"""Run a cluster of node processes on this machine (``raftkv up`` and the tests).

A cluster directory holds ``cluster.json``, ``secret`` and one folder per node
with its data, ``node.log`` and ``node.pid``. Node processes run in their own
session, so they outlive the command that started them (``raftkv up`` returns)
and a signal to the CLI does not reach them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cbor2

from raftkv import config as configmod
from raftkv.config import ClusterConfig, KeyspaceConfig, NodeConfig, ReplicaConfig, ShardConfig
from raftkv.protocol.framing import FrameDecoder, encode_frame
from raftkv.replication.replica import RaftSettings

DEFAULT_DIR = Path(os.environ.get("RAFTKV_HOME", Path.home() / ".raftkv")) / "local"


class ClusterError(Exception):
    """Starting, finding or stopping the local cluster failed (the message says why)."""


def free_port(host: str = "127.0.0.1", taken: set[int] | None = None) -> int:
    """A port the OS says is free now, not in ``taken``."""
    taken = taken if taken is not None else set()
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in taken:
            taken.add(port)
            return port


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _process_alive(pid: int) -> bool:
    """False once ``pid`` has exited with all its threads (a zombie whose other
    threads are still exiting counts as alive: they may hold its sockets)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except (OSError, IndexError):
        return False
    return not (state in ("Z", "X") and threads <= 1)


def probe(address: str, op: str = "status", timeout_s: float = 1.0) -> dict[str, Any]:
    """One blocking request to one node (status or ping). Raises OSError on failure."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.settimeout(timeout_s)
        sock.sendall(encode_frame(cbor2.dumps({"id": 1, "op": op})))
        decoder = FrameDecoder()
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError(f"{address} closed the connection")
            decoder.feed(data)
            for body in decoder.frames():
                reply = cbor2.loads(body)
                if "ok" not in reply:
                    raise ConnectionError(f"{address} answered {reply!r}")
                result: dict[str, Any] = reply["ok"]
                return result


def make_config(nodes: int = 3, dcs: int = 3, host: str = "127.0.0.1",
                raft: RaftSettings | None = None) -> ClusterConfig:
    """One physical shard replicated on every node; node i in data center i mod dcs."""
    taken: set[int] = set()
    node_configs = tuple(
        NodeConfig(f"n{i + 1}", f"dc{i % dcs + 1}", host, free_port(host, taken))
        for i in range(nodes)
    )
    shard = ShardConfig(0, tuple(ReplicaConfig(n.id, free_port(host, taken))
                                 for n in node_configs))
    return ClusterConfig(node_configs, (shard,), (KeyspaceConfig("default", 0),),
                         raft or RaftSettings())


class LocalCluster:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory).resolve()
        self.config, self.secret = configmod.load(self.directory)
        # processes this object started (so their exit can be reaped and seen)
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    @classmethod
    def create(cls, directory: Path, **options: Any) -> LocalCluster:
        directory = Path(directory)
        if (directory / configmod.CONFIG_NAME).exists():
            raise ClusterError(f"a cluster already exists at {directory}")
        configmod.save(directory, make_config(**options))
        return cls(directory)

    @classmethod
    def open_or_create(cls, directory: Path, **options: Any) -> LocalCluster:
        if (Path(directory) / configmod.CONFIG_NAME).exists():
            return cls(directory)
        return cls.create(directory, **options)

    # -- addresses and pids ------------------------------------------------------

    @property
    def node_ids(self) -> list[str]:
        return [n.id for n in self.config.nodes]

    def client_addresses(self) -> list[str]:
        return [n.client_address for n in self.config.nodes]

    def address(self, node_id: str) -> str:
        return self.config.node(node_id).client_address

    def node_dir(self, node_id: str) -> Path:
        return self.directory / node_id

    def _pid_file(self, node_id: str) -> Path:
        return self.node_dir(node_id) / "node.pid"

    def pid(self, node_id: str) -> int | None:
        """The pid of the node's process if it is running (checked against /proc)."""
        try:
            pid = int(self._pid_file(node_id).read_text())
        except (FileNotFoundError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return None  # exited, not yet reaped
        if b"node" not in cmdline or node_id.encode() not in cmdline:
            return None  # the pid was reused by another process
        return pid

    def is_running(self, node_id: str) -> bool:
        return self.pid(node_id) is not None

    # -- start and stop --------------------------------------------------------------

    def start_node(self, node_id: str) -> int:
        existing = self.pid(node_id)
        if existing is not None:
            return existing
        node = self.config.node(node_id)
        ports = [node.client_port] + [
            r.raft_port for s in self.config.shards for r in s.replicas if r.node == node_id]
        for port in ports:
            if not port_is_free(node.host, port):
                raise ClusterError(f"cannot start {node_id}: port {port} on {node.host} is in use")
        directory = self.node_dir(node_id)
        directory.mkdir(parents=True, exist_ok=True)
        log = open(directory / "node.log", "ab")  # noqa: SIM115 - handed to the child
        process = subprocess.Popen(
            [sys.executable, "-m", "raftkv_cli.main", "node", "--cluster", str(self.directory),
             "--id", node_id],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True,
        )
        log.close()
        self._pid_file(node_id).write_text(str(process.pid))
        self._children[node_id] = process
        return process.pid

    def start(self, timeout_s: float = 30.0) -> None:
        for node_id in self.node_ids:
            self.start_node(node_id)
        self.wait_ready(timeout_s)

    def signal_node(self, node_id: str, signum: int) -> int | None:
        """Signal the node's process; returns its pid (None if it was not running)."""
        pid = self.pid(node_id)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        return pid

    def kill_node(self, node_id: str) -> None:
        """kill -9: no shutdown, no flush."""
        pid = self.signal_node(node_id, signal.SIGKILL)
        self._wait_exit(node_id, pid, 10.0)

    def pause_node(self, node_id: str) -> None:
        self.signal_node(node_id, signal.SIGSTOP)

    def resume_node(self, node_id: str) -> None:
        self.signal_node(node_id, signal.SIGCONT)

    def stop_node(self, node_id: str, timeout_s: float = 10.0) -> None:
        self.signal_node(node_id, signal.SIGCONT)
        pid = self.signal_node(node_id, signal.SIGTERM)
        if not self._wait_exit(node_id, pid, timeout_s):
            self.kill_node(node_id)

    def _wait_exit(self, node_id: str, pid: int | None, timeout_s: float) -> bool:
        """Wait until process ``pid`` is gone with every thread, so its ports are
        free again. ``self.pid()`` is no test: a dying process loses its cmdline
        (and shows as a zombie) while its threads still hold its sockets."""
        if pid is None:
            return True
        child = self._children.get(node_id)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if child is not None and child.pid == pid:
                if child.poll() is not None:  # reaped: every thread has exited
                    return True
            elif not _process_alive(pid):
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        for node_id in self.node_ids:
            self.stop_node(node_id)

    # -- readiness -----------------------------------------------------------------

    def statuses(self, timeout_s: float = 1.0) -> dict[str, dict[str, Any] | None]:
        out: dict[str, dict[str, Any] | None] = {}
        for node in self.config.nodes:
            try:
                out[node.id] = probe(node.client_address, timeout_s=timeout_s)
            except (OSError, ValueError):
                out[node.id] = None
        return out

    def leaders(self) -> dict[int, str]:
        """shard id -> node id of the replica that reports itself leader."""
        leaders: dict[int, str] = {}
        for node_id, status in self.statuses().items():
            for shard in (status or {}).get("shards", []):
                if shard["role"] == "leader":
                    leaders[shard["id"]] = node_id
        return leaders

    def wait_ready(self, timeout_s: float = 30.0) -> dict[int, str]:
        """Wait until every shard has a leader; returns shard -> leader node id."""
        deadline = time.monotonic() + timeout_s
        want = {s.id for s in self.config.shards}
        while time.monotonic() < deadline:
            leaders = self.leaders()
            if set(leaders) >= want:
                return leaders
            for node_id in self.node_ids:
                child = self._children.get(node_id)
                if child is not None and child.poll() is not None:
                    raise ClusterError(
                        f"node {node_id} exited with code {child.returncode}; see "
                        f"{self.node_dir(node_id) / 'node.log'}")
            time.sleep(0.1)
        raise ClusterError(f"no leader elected within {timeout_s} s; node logs are in "
                           f"{self.directory}")
