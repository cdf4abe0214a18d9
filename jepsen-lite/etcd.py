"""etcd as a jepsen-lite target: the register workload against a real cluster.

Three pieces, from the outside in:

* `ensure_etcd` finds the ``etcd`` binary, or installs Debian's
  ``etcd-server`` package without letting it start a system service;
* `EtcdCluster` runs ``size`` members on 127.0.0.1, each with its own data
  directory and log file, and does the faults (SIGKILL and restart, SIGSTOP
  and SIGCONT);
* `EtcdTarget` and `EtcdClient` implement `jepsen_lite.target.Target` and
  `Client`: operations go to etcd's v3 JSON gateway over HTTP/1.1.

How an operation ends (target.py's rules, applied to etcd):

* ``read`` is a linearizable range (``serializable: false``): ok with the int
  read, or None when the key is absent;
* ``write`` is a put: ok;
* ``cas [from, to]`` is a txn comparing the key's value to ``from`` (``from``
  None: ``create_revision == 0``, the key is absent) and putting ``to`` when
  it holds: ok if it succeeded, fail without error if the compare was false;
* the request could not reach etcd (the connection was refused, or there was
  none to send on): fail with an error;
* etcd answered with an error that means the request was rejected before it
  was proposed (`_DEFINITE_MESSAGES`, an invalid argument): fail with an error;
* anything else (a timeout, a connection lost after sending, an unexpected
  answer, any other etcd error): info with an error.

Values are stored as decimal strings.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import platform
import select
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import trio

from jepsen_lite.target import Completion, FaultError, Op

ETCD_PACKAGE: Final = "etcd-server"
ETCD_DEFAULT_PATH: Final = Path("/usr/bin/etcd")
APT_TIMEOUT_S: Final = 900.0
APT_LOCK_TIMEOUT_S: Final = 120
POLICY_RC_D: Final = Path("/usr/sbin/policy-rc.d")
# policy-rc.d's answer "action forbidden by policy": invoke-rc.d starts nothing.
_POLICY_DENY_ALL: Final = (
    "#!/bin/sh\n# jepsen-lite: installing etcd-server, start no service\nexit 101\n"
)
MANUAL_INSTALL_HINT: Final = (
    "install it by hand: sudo apt-get install etcd-server (Debian/Ubuntu), "
    "or put an etcd >= 3.4 binary on PATH"
)

# Raft timing: etcd's defaults are 100 ms / 1000 ms; halved, a killed leader is
# replaced in about a second. Members are on loopback, so this is stable.
HEARTBEAT_INTERVAL_MS: Final = 50
ELECTION_TIMEOUT_MS: Final = 500

REQUEST_TIMEOUT_S: Final = 2.0
READY_POLL_INTERVAL_S: Final = 0.1
READY_REQUEST_TIMEOUT_S: Final = 1.0
RESTART_TIMEOUT_S: Final = 10.0
EXIT_WAIT_TIMEOUT_S: Final = 10.0
LOG_TAIL_LINES: Final = 20

# gRPC status codes that the gateway puts in its error bodies.
_GRPC_INVALID_ARGUMENT: Final = 3

# etcd errors returned before the request is proposed to raft, or by a
# proposal raft dropped without appending it: the operation did not happen.
# (etcd 3.4, etcdserver/api/v3rpc/rpctypes/error.go and raft.ErrProposalDropped.)
_DEFINITE_MESSAGES: Final = frozenset({
    "etcdserver: no leader",
    "etcdserver: too many requests",
    "etcdserver: request is too large",
    "etcdserver: not capable",
    "etcdserver: rpc not supported for learner",
    "etcdserver: mvcc: database space exceeded",
    "raft proposal dropped",
})

# Go architecture names etcd 3.4 runs on only when ETCD_UNSUPPORTED_ARCH names them.
_UNSUPPORTED_GO_ARCH: Final = {"aarch64": "arm64", "arm64": "arm64", "s390x": "s390x"}


class EtcdError(Exception):
    """Base class of this module's errors."""


class EtcdUnavailable(EtcdError):
    """Raised by `ensure_etcd` when etcd is not installed and cannot be (not
    root, no apt-get, apt failed). The message is one line: why, and how to
    install it by hand."""


class EtcdStartError(EtcdError):
    """Raised by `EtcdCluster.start` and `EtcdCluster.restart` when a member
    exits or the cluster does not answer in time; the message holds the tail
    of the member's log. Every member started is killed before it is raised."""


class EtcdMemberError(EtcdError):
    """Raised by the fault methods of `EtcdCluster` for an unknown member, a
    member that is not running, or a cluster not started."""


# --------------------------------------------------------------------------
# Finding and installing etcd


def find_etcd() -> Path | None:
    """The etcd binary: ``etcd`` on PATH, else /usr/bin/etcd, else None."""
    found = shutil.which("etcd")
    if found is not None:
        return Path(found)
    if ETCD_DEFAULT_PATH.is_file() and os.access(ETCD_DEFAULT_PATH, os.X_OK):
        return ETCD_DEFAULT_PATH
    return None


def ensure_etcd() -> Path:
    """The etcd binary, installing Debian's ``etcd-server`` if it is missing.

    The install is non-interactive, and no etcd service is left running: a
    policy-rc.d that forbids every start is in place while apt runs, and an
    etcd process that appears during the install is killed. Raises
    `EtcdUnavailable` when etcd is missing and cannot be installed.
    """
    found = find_etcd()
    if found is not None:
        return found
    if os.geteuid() != 0:
        raise EtcdUnavailable(f"etcd is not installed and installing it needs root; "
                              f"{MANUAL_INSTALL_HINT}")
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        raise EtcdUnavailable(f"etcd is not installed and there is no apt-get; "
                              f"{MANUAL_INSTALL_HINT}")
    etcd_pids_before = _etcd_pids()
    try:
        with _services_forbidden():
            result = _apt_get(apt_get, "install", "--no-install-recommends", ETCD_PACKAGE)
            if result.returncode != 0:  # the package lists may be stale or missing
                _apt_get(apt_get, "update")
                result = _apt_get(apt_get, "install", "--no-install-recommends", ETCD_PACKAGE)
    except (OSError, subprocess.SubprocessError) as exc:
        raise EtcdUnavailable(f"apt-get install {ETCD_PACKAGE} failed ({exc}); "
                              f"{MANUAL_INSTALL_HINT}") from exc
    finally:
        _kill_new_etcd_processes(etcd_pids_before)
    if result.returncode != 0:
        raise EtcdUnavailable(f"apt-get install {ETCD_PACKAGE} failed "
                              f"({_last_line(result.stdout)}); {MANUAL_INSTALL_HINT}")
    found = find_etcd()
    if found is None:
        raise EtcdUnavailable(f"apt-get installed {ETCD_PACKAGE} but no etcd binary was found "
                              f"on PATH or at {ETCD_DEFAULT_PATH}; {MANUAL_INSTALL_HINT}")
    return found


def _apt_get(apt_get: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        [apt_get, "-y", "-q", "-o", f"DPkg::Lock::Timeout={APT_LOCK_TIMEOUT_S}",
         "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold",
         *args],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=APT_TIMEOUT_S, check=False,
    )


@contextlib.contextmanager
def _services_forbidden() -> Iterator[None]:
    """While inside, invoke-rc.d starts no service (a policy-rc.d exiting 101);
    an existing policy-rc.d is put back afterwards, byte for byte."""
    saved: tuple[bytes, int] | None = None
    if POLICY_RC_D.exists():
        saved = (POLICY_RC_D.read_bytes(), POLICY_RC_D.stat().st_mode)
    POLICY_RC_D.write_text(_POLICY_DENY_ALL)
    POLICY_RC_D.chmod(0o755)
    try:
        yield
    finally:
        if saved is None:
            POLICY_RC_D.unlink(missing_ok=True)
        else:
            POLICY_RC_D.write_bytes(saved[0])
            POLICY_RC_D.chmod(saved[1] & 0o7777)


def _etcd_pids() -> set[int]:
    """Processes whose executable is named ``etcd`` (from /proc)."""
    pids: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if Path(os.readlink(entry / "exe")).name == "etcd":
                pids.add(int(entry.name))
    return pids


def _kill_new_etcd_processes(before: set[int]) -> None:
    """Kill an etcd the package install started despite policy-rc.d."""
    for pid in _etcd_pids() - before:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


# --------------------------------------------------------------------------
# The cluster


@dataclass
class _Member:
    name: str
    client_port: int
    peer_port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class EtcdCluster:
    """``size`` etcd members on 127.0.0.1, named e1, e2, ...

    Under ``directory``: ``<name>.etcd/`` (data) and ``<name>.log`` (stdout
    and stderr, appended across restarts). Ports are picked from the OS at the
    first `start` and kept, so a member restarts on its own ports and a
    cluster stopped and started again resumes from its data. fsync stays on.
    """

    def __init__(self, directory: Path, size: int = 3, binary: Path | None = None) -> None:
        if size < 1:
            raise ValueError(f"an etcd cluster needs at least one member, got size={size}")
        self.directory = directory
        self.size = size
        self.binary = binary
        self.members: list[str] = [f"e{i}" for i in range(1, size + 1)]
        self._members: dict[str, _Member] = {}
        self._token = f"jepsen-lite-{uuid.uuid4().hex[:12]}"

    @property
    def client_urls(self) -> list[str]:
        """Each member's client URL, in `members` order (known after `start`)."""
        if not self._members:
            raise EtcdMemberError("the cluster has not been started")
        return [self._members[name].client_url for name in self.members]

    def data_dir(self, member: str) -> Path:
        return self.directory / f"{member}.etcd"

    def log_path(self, member: str) -> Path:
        return self.directory / f"{member}.log"

    def pid(self, member: str) -> int | None:
        """The member's process id while it runs, else None."""
        m = self._member(member)
        return m.process.pid if m.process is not None and m.running() else None

    def start(self, timeout_s: float = 30.0) -> None:
        """Start every member; return once each answers a linearizable read.

        Raises `EtcdStartError` (every member killed) when one exits or
        ``timeout_s`` passes first."""
        if any(m.running() for m in self._members.values()):
            raise EtcdStartError("the cluster is already running")
        if self.binary is None:
            self.binary = ensure_etcd()
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self._members:
            ports = _free_ports(2 * self.size)
            self._members = {
                name: _Member(name, ports[2 * i], ports[2 * i + 1])
                for i, name in enumerate(self.members)
            }
        deadline = time.monotonic() + timeout_s
        try:
            for m in self._members.values():
                self._spawn(m)
            self._wait_ready(deadline)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGKILL every member and reap it. Idempotent; safe after a failed start.
        If one cannot be reaped the others are still killed, then the first
        error is raised."""
        errors: list[Exception] = []
        for m in self._members.values():
            try:
                self._kill(m)
            except (OSError, subprocess.SubprocessError) as exc:
                errors.append(exc)
        if errors:
            raise EtcdError(f"stop: {len(errors)} member(s) not reaped: {errors[0]}") from errors[0]

    def kill(self, member: str) -> int:
        """SIGKILL ``member`` and reap it; returns its pid."""
        m = self._running_member(member)
        assert m.process is not None
        pid = m.process.pid
        self._kill(m)
        return pid

    def restart(self, member: str) -> int:
        """Start ``member`` again (SIGKILL first if it still runs); returns the
        new pid once its client port accepts connections. It answers reads only
        when it can reach a majority."""
        m = self._member(member)
        self._kill(m)
        process = self._spawn(m)
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while not _port_accepts(m.client_port):
            if process.poll() is not None:
                raise EtcdStartError(f"{member} exited with {process.returncode} on restart"
                                     f"{self._log_tail(member)}")
            if time.monotonic() > deadline:
                self._kill(m)
                raise EtcdStartError(f"{member} did not listen on {m.client_url} within "
                                     f"{RESTART_TIMEOUT_S} s of restart{self._log_tail(member)}")
            time.sleep(READY_POLL_INTERVAL_S)
        return process.pid

    def pause(self, member: str) -> int:
        """SIGSTOP ``member``; returns its pid."""
        return self._signal(member, signal.SIGSTOP)

    def resume(self, member: str) -> int:
        """SIGCONT ``member`` (harmless if it is not paused); returns its pid."""
        return self._signal(member, signal.SIGCONT)

    def _member(self, member: str) -> _Member:
        if not self._members:
            raise EtcdMemberError("the cluster has not been started")
        try:
            return self._members[member]
        except KeyError:
            raise EtcdMemberError(f"no member {member!r}; members are "
                                  f"{', '.join(self.members)}") from None

    def _running_member(self, member: str) -> _Member:
        m = self._member(member)
        if not m.running():
            raise EtcdMemberError(f"{member} is not running")
        return m

    def _signal(self, member: str, signum: signal.Signals) -> int:
        m = self._running_member(member)
        assert m.process is not None
        m.process.send_signal(signum)
        return m.process.pid

    def _kill(self, m: _Member) -> None:
        if m.process is None:
            return
        if m.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                m.process.kill()  # SIGKILL also ends a SIGSTOPped process
        m.process.wait(timeout=EXIT_WAIT_TIMEOUT_S)
        m.process = None

    def _spawn(self, m: _Member) -> subprocess.Popen[bytes]:
        assert self.binary is not None
        initial_cluster = ",".join(f"{x.name}={x.peer_url}" for x in self._members.values())
        argv = [
            str(self.binary),
            "--name", m.name,
            "--data-dir", str(self.data_dir(m.name)),
            "--listen-client-urls", m.client_url,
            "--advertise-client-urls", m.client_url,
            "--listen-peer-urls", m.peer_url,
            "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", initial_cluster,
            "--initial-cluster-state", "new",  # ignored once the data directory exists
            "--initial-cluster-token", self._token,
            "--heartbeat-interval", str(HEARTBEAT_INTERVAL_MS),
            "--election-timeout", str(ELECTION_TIMEOUT_MS),
            # A restarted or resumed member does not depose a healthy leader
            # (the default from etcd 3.5 on).
            "--pre-vote",
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]
        try:
            with self.log_path(m.name).open("ab") as log:
                m.process = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=_etcd_env(), start_new_session=True,
                )
        except OSError as exc:
            raise EtcdStartError(f"cannot run {self.binary} for {m.name}: {exc}") from exc
        return m.process

    def _wait_ready(self, deadline: float) -> None:
        pending = list(self._members.values())
        while pending:
            for m in pending:
                if not m.running():
                    code = m.process.returncode if m.process is not None else None
                    raise EtcdStartError(f"{m.name} exited with {code} during start"
                                         f"{self._log_tail(m.name)}")
            pending = [m for m in pending if not _answers_linearizable_read(m.client_url)]
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(m.name for m in pending)
                raise EtcdStartError(f"no linearizable read from {names} before the start "
                                     f"timeout{self._log_tail(pending[0].name)}")
            time.sleep(READY_POLL_INTERVAL_S)

    def _log_tail(self, member: str) -> str:
        try:
            lines = self.log_path(member).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        tail = "\n".join(lines[-LOG_TAIL_LINES:])
        return f"; last lines of {self.log_path(member)}:\n{tail}" if tail else ""


def _etcd_env() -> dict[str, str]:
    # etcd reads ETCD_<FLAG> variables and refuses one that a flag shadows.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
    arch = _UNSUPPORTED_GO_ARCH.get(platform.machine())
    if arch is not None:
        env["ETCD_UNSUPPORTED_ARCH"] = arch
    return env


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports the OS had free on 127.0.0.1 (bound to 0, then released)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=READY_REQUEST_TIMEOUT_S):
            return True
    except OSError:
        return False


def _answers_linearizable_read(client_url: str) -> bool:
    client = EtcdClient([client_url], 0, request_timeout_s=READY_REQUEST_TIMEOUT_S)
    try:
        return client.invoke_blocking(Op("read", "jepsen-lite/ready")).type == "ok"
    finally:
        client.close()


# --------------------------------------------------------------------------
# The target and its clients


class EtcdTarget:
    """`jepsen_lite.target.Target` for the register workload on an `EtcdCluster`.

    The cluster is started and stopped by the caller. Client ``process`` talks
    to member ``process % size`` first, and moves to the next member after a
    connection error or a timeout. Faults: ``kill`` (SIGKILL, healed by a
    restart) and ``pause`` (SIGSTOP, healed by SIGCONT), on any member.
    """

    name: str = "etcd"

    def __init__(self, cluster: EtcdCluster, request_timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.cluster = cluster
        self.request_timeout_s = request_timeout_s

    def client(self, process: int) -> AbstractAsyncContextManager[EtcdClient]:
        return self._open_client(process)

    @asynccontextmanager
    async def _open_client(self, process: int) -> AsyncIterator[EtcdClient]:
        urls = self.cluster.client_urls
        client = EtcdClient(urls, process % len(urls), self.request_timeout_s)
        try:
            yield client
        finally:
            client.close()

    def nemesis_targets(self) -> dict[str, list[str]]:
        return {"kill": list(self.cluster.members), "pause": list(self.cluster.members)}

    def inject(self, kind: str, target: str) -> str:
        try:
            if kind == "kill":
                return f"killed {target} (SIGKILL pid {self.cluster.kill(target)})"
            if kind == "pause":
                return f"paused {target} (SIGSTOP pid {self.cluster.pause(target)})"
        except (EtcdError, OSError, subprocess.SubprocessError) as exc:
            raise FaultError(f"etcd: cannot {kind} {target}: {exc}") from exc
        raise FaultError(f"etcd: unknown fault kind {kind!r}; known: kill, pause")

    def heal(self, kind: str, target: str) -> str:
        try:
            if kind == "kill":
                return f"restarted {target} (pid {self.cluster.restart(target)})"
            if kind == "pause":
                return f"resumed {target} (SIGCONT pid {self.cluster.resume(target)})"
        except (EtcdError, OSError, subprocess.SubprocessError) as exc:
            raise FaultError(f"etcd: cannot heal {kind} on {target}: {exc}") from exc
        raise FaultError(f"etcd: unknown fault kind {kind!r}; known: kill, pause")

    def summary(self) -> dict[str, Any]:
        return {}


class _RequestFailed(Exception):
    """A request that did not return a result: ``definite`` when it cannot
    have taken effect (``fail``), else its outcome is unknown (``info``)."""

    def __init__(self, error: str, *, definite: bool) -> None:
        super().__init__(error)
        self.error = error
        self.definite = definite


class EtcdClient:
    """One process's client: a keep-alive HTTP/1.1 connection to one member.

    ``invoke`` runs the blocking request in a trio worker thread; one
    operation at a time. ``request_timeout_s`` bounds each socket operation
    (connect, send, receive). After a connection error or a timeout the client
    moves to the next member (``member_index``).
    """

    def __init__(self, client_urls: list[str], member_index: int = 0,
                 request_timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        if not client_urls:
            raise ValueError("an etcd client needs at least one client URL")
        self.client_urls = list(client_urls)
        self.member_index = member_index % len(client_urls)
        self.request_timeout_s = request_timeout_s
        self._conn: http.client.HTTPConnection | None = None

    @property
    def url(self) -> str:
        """The member this client sends its next request to."""
        return self.client_urls[self.member_index]

    async def invoke(self, op: Op) -> Completion:
        return await trio.to_thread.run_sync(self.invoke_blocking, op)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def invoke_blocking(self, op: Op) -> Completion:
        """`invoke`, in the calling thread."""
        try:
            path, body = _request_for(op)
        except (TypeError, ValueError) as exc:  # never sent
            return Completion("fail", error=f"etcd: cannot send {op.f} {op.value!r}: {exc}")
        try:
            reply = self._call(path, body)
        except _RequestFailed as exc:
            return Completion("fail" if exc.definite else "info", error=exc.error)
        if op.f == "write":
            return Completion("ok", op.value)
        if op.f == "cas":
            if reply.get("succeeded", False) is True:  # the gateway omits false
                return Completion("ok", list(op.value))
            return Completion("fail")
        kvs = reply.get("kvs") or []  # read; the gateway omits an empty list
        if not kvs:
            return Completion("ok", None)
        try:
            return Completion("ok", _decode_value(kvs[0].get("value")))
        except (TypeError, ValueError, AttributeError):
            return Completion("info", error=f"{self.url}{path}: not a register value: {kvs[0]!r}")

    def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to ``path``; the decoded reply of a 200, else `_RequestFailed`."""
        request = json.dumps(body).encode()  # before connecting: a bad body is never sent
        conn = self._connection()
        url = self.url
        try:
            conn.request("POST", path, body=request, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self._move_on()
            raise _RequestFailed(f"{url}{path}: {_describe(exc)} after sending",
                                 definite=False) from exc
        try:
            reply = json.loads(data)
        except ValueError:
            reply = None
        if response.status == 200 and isinstance(reply, dict):
            return reply
        if response.status == 200:
            raise _RequestFailed(f"{url}{path}: unexpected reply {data[:200]!r}", definite=False)
        message, definite = _classify_error(response.status, reply)
        raise _RequestFailed(f"{url}{path}: HTTP {response.status}: {message}", definite=definite)

    def _connection(self) -> http.client.HTTPConnection:
        """An open connection; `_RequestFailed` (definite) when none can be made."""
        if self._conn is not None and _dropped(self._conn):
            self.close()
        if self._conn is None:
            url = self.url
            parts = urlsplit(url)
            conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port,
                                              timeout=self.request_timeout_s)
            try:
                conn.connect()
            except OSError as exc:
                conn.close()
                self._move_on()
                raise _RequestFailed(f"{url}: connect: {_describe(exc)}",
                                     definite=True) from exc
            self._conn = conn
        return self._conn

    def _move_on(self) -> None:
        self.close()
        self.member_index = (self.member_index + 1) % len(self.client_urls)


def _request_for(op: Op) -> tuple[str, dict[str, Any]]:
    """The gateway path and JSON body of ``op``; TypeError or ValueError if it
    is not a register operation this target can send."""
    if not isinstance(op.key, str):
        raise TypeError(f"the register workload needs a string key, got {op.key!r}")
    key = _b64(op.key)
    if op.f == "read":
        return "/v3/kv/range", {"key": key, "serializable": False}
    if op.f == "write":
        return "/v3/kv/put", {"key": key, "value": _encode_value(op.value)}
    if op.f == "cas":
        expected, new = op.value
        if expected is None:  # expect absent: the key was never created (or was deleted)
            compare = {"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
        else:
            compare = {"key": key, "target": "VALUE", "result": "EQUAL",
                       "value": _encode_value(expected)}
        put = {"request_put": {"key": key, "value": _encode_value(new)}}
        return "/v3/kv/txn", {"compare": [compare], "success": [put]}
    raise ValueError(f"unsupported operation {op.f!r} (read, write, cas)")


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """True if an idle keep-alive connection was closed by the server: it is
    readable (EOF, or bytes nobody asked for) while no request is out."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _classify_error(status: int, reply: Any) -> tuple[str, bool]:
    """(message, definite) for an HTTP error from the gateway."""
    if not isinstance(reply, dict):
        return "no error body", False
    message = str(reply.get("message") or reply.get("error") or reply)
    code = reply.get("code")
    if message in _DEFINITE_MESSAGES or code == _GRPC_INVALID_ARGUMENT:
        return message, True
    return message, False


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def _encode_value(value: Any) -> str:
    if type(value) is not int:
        raise TypeError(f"register values are ints, got {type(value).__name__}")
    return _b64(str(value))


def _decode_value(value: Any) -> int:
    """The int stored as a base64 decimal string (etcd omits an empty value)."""
    return int(base64.b64decode(value or ""))
