"""Run a cluster of node processes on this machine (``raftkv up`` and the tests).

A cluster directory holds ``cluster.json``, ``secret`` and one folder per
process (nodes ``n1..`` and shard manager replicas ``m1..``) with its data,
``node.log`` and ``node.pid``. Node processes run in their own
session, so they outlive the command that started them (``raftkv up`` returns)
and a signal to the CLI does not reach them.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import cbor2

from raftkv import config as configmod
from raftkv.config import ClusterConfig, KeyspaceDefaults, ManagerConfig, NodeConfig
from raftkv.errors import NotLeader, RaftKVError, Unavailable, error_from_wire
from raftkv.faults import FAULTS_NAME, FaultSpec
from raftkv.protocol.framing import FrameDecoder, FrameTooLarge, encode_frame
from raftkv.replication.settings import RaftSettings

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


def kill_processes_of(directory: Path) -> list[int]:
    """kill -9 every raftkv process of the cluster in ``directory``, found by its
    pid files and checked against /proc, without reading the cluster config
    (for a directory whose config this version cannot read). Returns the pids."""
    killed = []
    for pid_file in Path(directory).glob("*/node.pid"):
        try:
            pid = int(pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"raftkv_cli.main" in cmdline and str(directory).encode() in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


def _process_alive(pid: int) -> bool:
    """False once ``pid`` has exited with all its threads (a zombie whose other
    threads are still exiting counts as alive: they may hold its sockets)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except (OSError, IndexError):
        return False
    return not (state in ("Z", "X") and threads <= 1)


def request(address: str, msg: dict[str, Any], timeout_s: float = 1.0) -> Any:
    """One blocking request to one node or shard manager replica. Raises OSError
    when it cannot be reached, or the RaftKVError it answers."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.settimeout(timeout_s)
        sock.sendall(encode_frame(cbor2.dumps({"id": 1, **msg})))
        decoder = FrameDecoder()
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError(f"{address} closed the connection")
            try:
                decoder.feed(data)
                bodies = list(decoder.frames())
                replies = [cbor2.loads(body) for body in bodies]
            except (FrameTooLarge, ValueError) as exc:  # cbor's errors are ValueErrors
                raise ConnectionError(f"{address} does not answer in raftkv's protocol: "
                                      f"{exc}") from exc
            for reply in replies:
                if not isinstance(reply, dict):
                    raise ConnectionError(f"{address} sent a reply that is not a map")
                if "ok" not in reply:
                    raise error_from_wire(reply.get("err"))
                return reply["ok"]


def probe(address: str, op: str = "status", timeout_s: float = 1.0) -> dict[str, Any]:
    """A status or ping request. Raises OSError (or RaftKVError) on failure."""
    result: dict[str, Any] = request(address, {"op": op}, timeout_s)
    return result


def manager_request(addresses: list[str], msg: dict[str, Any], timeout_s: float = 10.0,
                    request_timeout_s: float = 5.0) -> Any:
    """A request to the shard manager's leader: follows NOT_LEADER hints and
    retries other replicas until ``timeout_s``. Definite refusals other than
    NOT_LEADER / UNAVAILABLE are raised at once."""
    deadline = time.monotonic() + timeout_s
    address = addresses[0]
    rotation = 0
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            return request(address, msg, request_timeout_s)
        except NotLeader as exc:
            last = exc
            if exc.leader is not None and exc.leader != address:
                address = exc.leader
                continue
        except (Unavailable, OSError, ValueError) as exc:
            last = exc
        except RaftKVError as exc:
            if exc.definite:
                raise
            last = exc
        rotation += 1
        address = addresses[rotation % len(addresses)]
        time.sleep(0.1)
    raise ClusterError(f"the shard manager did not answer {msg.get('op')!r} within "
                       f"{timeout_s} s (last error: {last})")


def free_port_range(host: str, count: int, taken: set[int]) -> int:
    """The first port of ``count`` consecutive ports free now on ``host``, below
    the kernel's ephemeral range (so outgoing connections do not take them)."""
    rng = random.Random()  # noqa: S311 - spreading ports, not security
    for _ in range(200):
        base = rng.randrange(20000, 32000 - count)
        ports = range(base, base + count)
        if not taken.intersection(ports) and all(port_is_free(host, p) for p in ports):
            taken.update(ports)
            return base
    raise ClusterError(f"found no {count} consecutive free ports on {host}")


RAFT_PORTS_PER_NODE = 64


def make_config(*, dcs: int = 3, nodes_per_dc: int = 1, hosts: list[str] | None = None,
                raft: RaftSettings | None = None, physical_shards: int = 1,
                logical_shards: int = 256, replication_factor: int = 3,
                inter_dc_latency_ms: float = 0.0, managers: int = 3) -> ClusterConfig:
    """Nodes ``n1..`` spread over data centers ``dc1..`` (node i in dc i mod dcs),
    and shard manager replicas ``m1..`` one per DC (round robin). ``hosts``: the
    addresses to spread the processes over (default 127.0.0.1 for all)."""
    hosts = hosts or ["127.0.0.1"]
    taken: dict[str, set[int]] = {h: set() for h in hosts}
    manager_configs = []
    # Every port the processes listen on lies below the kernel's ephemeral range,
    # so a process restarted after a crash does not find its port taken as the
    # source port of some outgoing connection.
    for i in range(managers):
        host = hosts[i % len(hosts)]
        manager_configs.append(ManagerConfig(
            f"m{i + 1}", f"dc{i % dcs + 1}", host, free_port_range(host, 1, taken[host]),
            free_port_range(host, 1, taken[host])))
    node_configs = []
    for i in range(dcs * nodes_per_dc):
        host = hosts[i % len(hosts)]
        base = free_port_range(host, RAFT_PORTS_PER_NODE, taken[host])
        node_configs.append(NodeConfig(
            f"n{i + 1}", f"dc{i % dcs + 1}", host, free_port_range(host, 1, taken[host]),
            base, base + RAFT_PORTS_PER_NODE - 1))
    return ClusterConfig(
        tuple(manager_configs), tuple(node_configs), raft or RaftSettings(),
        KeyspaceDefaults(logical_shards, physical_shards, replication_factor),
        inter_dc_latency_ms)


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

    @property
    def manager_ids(self) -> list[str]:
        return [m.id for m in self.config.managers]

    @property
    def process_ids(self) -> list[str]:
        return self.manager_ids + self.node_ids

    def client_addresses(self) -> list[str]:
        """Where clients start: the shard manager's replicas (they serve the map)."""
        return self.config.manager_addresses

    def address(self, process_id: str) -> str:
        if process_id in self.manager_ids:
            return self.config.manager(process_id).client_address
        return self.config.node(process_id).client_address

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
        if b"raftkv_cli.main" not in cmdline or node_id.encode() not in cmdline:
            return None  # the pid was reused by another process
        return pid

    def is_running(self, node_id: str) -> bool:
        return self.pid(node_id) is not None

    # -- start and stop --------------------------------------------------------------

    def start_node(self, node_id: str) -> int:
        """Start a node or a shard manager replica (by id)."""
        existing = self.pid(node_id)
        if existing is not None:
            return existing
        if node_id in self.manager_ids:
            manager = self.config.manager(node_id)
            host, ports, command = manager.host, [manager.client_port, manager.raft_port], \
                "shardmgr"
        else:
            node = self.config.node(node_id)
            # The node's Raft hub listens on the first port of its Raft range.
            host, ports, command = node.host, [node.client_port, node.raft_port_min], "node"
        for port in ports:
            if not port_is_free(host, port):
                raise ClusterError(f"cannot start {node_id}: port {port} on {host} is in use")
        directory = self.node_dir(node_id)
        directory.mkdir(parents=True, exist_ok=True)
        log = open(directory / "node.log", "ab")  # noqa: SIM115 - handed to the child
        process = subprocess.Popen(
            [sys.executable, "-m", "raftkv_cli.main", command, "--cluster",
             str(self.directory), "--id", node_id],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True,
        )
        log.close()
        self._pid_file(node_id).write_text(str(process.pid))
        self._children[node_id] = process
        return process.pid

    def start(self, timeout_s: float = 30.0) -> None:
        """Start every process; create keyspace ``default`` on first start; return
        once every physical shard has a leader."""
        for process_id in self.process_ids:
            self.start_node(process_id)
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
        for process_id in self.process_ids:
            self.stop_node(process_id)

    # -- readiness -----------------------------------------------------------------

    # -- network faults ---------------------------------------------------------------

    def fault_spec(self) -> FaultSpec:
        """The fault spec in force (``faults.json``, else only the configured latency)."""
        path = self.directory / FAULTS_NAME
        if path.exists():
            return FaultSpec.from_json(json.loads(path.read_text()))
        return FaultSpec(inter_dc_latency_ms=self.config.inter_dc_latency_ms)

    def set_fault_spec(self, spec: FaultSpec) -> list[str]:
        """Save ``spec`` (processes read it when they start) and push it to every
        running process; returns the processes that did not take it."""
        (self.directory / FAULTS_NAME).write_text(json.dumps(spec.to_json()) + "\n")
        unreachable = []
        for process_id in self.process_ids:
            try:
                request(self.address(process_id), {"op": "fault", "spec": spec.to_json()})
            except (OSError, RaftKVError):
                unreachable.append(process_id)
        return unreachable

    def statuses(self, timeout_s: float = 1.0) -> dict[str, dict[str, Any] | None]:
        """Status of every node and shard manager replica (None: no answer)."""
        out: dict[str, dict[str, Any] | None] = {}
        for process_id in self.process_ids:
            try:
                out[process_id] = probe(self.address(process_id), timeout_s=timeout_s)
            except (OSError, ValueError, RaftKVError):
                out[process_id] = None
        return out

    def manager(self, msg: dict[str, Any], timeout_s: float = 10.0) -> Any:
        """A request to the shard manager's leader."""
        return manager_request(self.client_addresses(), msg, timeout_s)

    def manager_leader(self) -> str | None:
        for manager_id in self.manager_ids:
            try:
                if probe(self.address(manager_id))["role"] == "leader":
                    return manager_id
            except (OSError, ValueError, RaftKVError):
                pass
        return None

    def leaders(self) -> dict[int, str]:
        """physical shard id -> node id of the replica that reports itself leader
        (the highest term wins if two do)."""
        best: dict[int, tuple[int, str]] = {}
        for node_id in self.node_ids:
            try:
                status = probe(self.address(node_id))
            except (OSError, ValueError, RaftKVError):
                continue
            for shard in status.get("shards", []):
                if shard["role"] == "leader" and shard["term"] >= best.get(
                        shard["id"], (-1, ""))[0]:
                    best[shard["id"]] = (shard["term"], node_id)
        return {shard: node for shard, (_, node) in best.items()}

    def _check_children(self) -> None:
        for process_id in self.process_ids:
            child = self._children.get(process_id)
            if child is not None and child.poll() is not None:
                raise ClusterError(
                    f"{process_id} exited with code {child.returncode}; see "
                    f"{self.node_dir(process_id) / 'node.log'}")

    def wait_ready(self, timeout_s: float = 30.0) -> dict[int, str]:
        """Wait until every node is registered and alive, keyspace ``default``
        exists (created with the configured defaults on first start) and is
        active, and every physical shard has a leader. Returns shard -> leader."""
        deadline = time.monotonic() + timeout_s
        want_nodes = set(self.node_ids)
        while True:
            self._check_children()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ClusterError(f"the cluster was not ready within {timeout_s} s; logs "
                                   f"are in {self.directory}/*/node.log")
            try:
                view = self.manager({"op": "cluster"}, timeout_s=min(remaining, 5.0))
            except ClusterError:
                continue
            alive = {n for n, info in view["nodes"].items() if info["alive"]}
            keyspaces = {k["name"]: k for k in view["state"]["keyspaces"]}
            if alive < want_nodes:
                time.sleep(0.1)
                continue
            if "default" not in keyspaces:
                with contextlib.suppress(RaftKVError, ClusterError):
                    self.manager({"op": "ks_create", "name": "default"},
                                 timeout_s=min(remaining, 5.0))
                continue
            shards = {s["id"] for s in view["state"]["shards"]}
            leaders = self.leaders()
            if all(k["state"] == "active" for k in keyspaces.values()
                   if k["state"] != "dropping") and set(leaders) >= shards:
                return leaders
            time.sleep(0.1)
