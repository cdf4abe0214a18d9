"""One replica of a physical shard: a pysyncobj group member over a LevelDB Store.

This is the only module that imports pysyncobj. It adds what pysyncobj lacks
(DESIGN section 5):

- durability: a ``DurableJournal``, and a transport that syncs it before every
  message leaves the node, so an entry is on disk before it is acknowledged
  to the leader or sent to a follower; a lone replica syncs before it applies;
- a fail-stop apply: no exception ever reaches pysyncobj's apply loop (which
  would apply the entry again); a replica that cannot write its state exits
  and replays its journal on restart;
- callbacks that never raise into the Raft thread;
- snapshots of the LevelDB state written in a background thread (no fork),
  installed by building a fresh database and swapping it in;
- a closed crash window in dump loading: before pysyncobj compares the dump with
  the journal, the journal prefix the dump covers is dropped, so a crash
  between writing a dump and truncating the journal no longer clears the
  journal's tail;
- encrypted, authenticated Raft traffic (``password``), bound to the
  configured address only.

Results reach the caller through ``submit(payload, on_done)``; ``on_done`` runs
on the Raft thread and must hand off (the node server uses
``trio.lowlevel.TrioToken.run_sync_soon``).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pysyncobj.syncobj as _pysyncobj_core
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated
from pysyncobj.config import SERIALIZER_STATE
from pysyncobj.transport import TCPTransport

from raftkv.errors import (
    InternalError,
    NotLeader,
    OutcomeUnknown,
    Overloaded,
    RaftKVError,
    Unavailable,
)
from raftkv.replication.journal import DurableJournal
from raftkv.statemachine.apply import ApplyFn, apply_entry
from raftkv.storage.leveldb import (
    SnapshotReader,
    Store,
    fsync_dir,
    write_snapshot,
)

log = logging.getLogger(__name__)

EXIT_APPLY_FAILED = 70
EXIT_SNAPSHOT_LOAD_FAILED = 71
EXIT_APPLIED_ENTRY_REPLACED = 72


class _ResendFilter(logging.Filter):
    """pysyncobj logs CRITICAL for every resent append-entries that overlaps
    applied entries. The DurableJournal keeps identical entries (no data is
    touched), so the message is noise; a real conflict is caught by
    ``Replica._on_log_conflict`` instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "truncating already-applied log entries" not in str(record.msg)


logging.getLogger("pysyncobj.syncobj").addFilter(_ResendFilter())

OnDone = Callable[[Any, RaftKVError | None], None]


# -- fail reasons, mapped in one place ----------------------------------------

def error_for_fail_reason(reason: int, leader: str | None = None) -> RaftKVError:
    """pysyncobj's FAIL_REASON as a raftkv error (definite or not)."""
    if reason == FAIL_REASON.QUEUE_FULL:
        return Overloaded("the replica's command queue is full")
    if reason == FAIL_REASON.MISSING_LEADER:
        return Unavailable("no leader is known (election in progress or no quorum)")
    if reason == FAIL_REASON.NOT_LEADER:
        return NotLeader("this replica is not the leader", leader=leader)
    if reason == FAIL_REASON.REQUEST_DENIED:
        return Unavailable("the request was denied by the Raft group")
    if reason == FAIL_REASON.DISCARDED:
        # The log position of the entry was taken by another leader's entry:
        # this entry will never be applied.
        return NotLeader("leadership changed before the command committed", leader=leader)
    if reason == FAIL_REASON.LEADER_CHANGED:
        return OutcomeUnknown("leadership changed while the command was in flight")
    if reason == FAIL_REASON.UNKNOWN_OUTCOME:
        return OutcomeUnknown("the Raft group lost track of the command")
    return InternalError(f"unexpected pysyncobj fail reason {reason}")


# -- injecting the durable journal ----------------------------------------------

_journals_lock = threading.Lock()
_pending_journals: dict[str, DurableJournal] = {}
_original_create_journal = _pysyncobj_core.createJournal


def _create_journal(journal_file: str | None) -> Any:
    with _journals_lock:
        journal = _pending_journals.pop(journal_file, None) if journal_file else None
    if journal is not None:
        return journal
    return _original_create_journal(journal_file)


_pysyncobj_core.createJournal = _create_journal


class _DurableTransport(TCPTransport):  # type: ignore[misc]
    """No acknowledgement of log entries leaves before those entries are synced.

    A follower's ``next_node_idx`` (its ack) waits in an outbox while the
    journal holds unsynced entries; at the end of each Raft tick, just before
    pysyncobj polls its sockets, one sync covers every entry appended during
    the tick and the outbox is flushed in order. This is group commit: one
    fsync per tick instead of one per entry.

    A leader's append-entries go out at once, so followers write in parallel
    with the leader (as Raft allows): the leader counts its own log toward a
    commit only at the start of its next tick, after this tick's sync.
    Once anything is queued, everything after it is queued too, so messages
    never overtake each other.

    Fault injection (DESIGN section 8), only when ``link`` is given.
    ``link(peer_address)`` says, per message, whether the link to that peer
    is cut (``None``) or else the one-way delay in seconds:

    - a message to a cut peer is dropped where it would leave the node (after
      the outbox, so the durability rule above is unchanged), and ``send``
      reports success, as a lost packet would; a message from a cut peer is
      dropped on arrival, before pysyncobj or the journal sees it;
    - a delayed message is held in a per-peer queue, in order, and sent at
      its due time by ``flush`` on the Raft tick thread (TCPTransport is not
      thread-safe). A message never overtakes an earlier one to the same peer,
      even when the delay shrinks. A held message whose link is cut by its due
      time is dropped (it was "on the wire"). The one ``_Waker`` thread wakes
      the tick thread at the earliest due time, so release is not rounded up
      to the tick period;
    - at most ``DELAYED_MAX`` messages are held; beyond that new messages are
      dropped (a full network buffer), which Raft recovers from by resending.

    Without ``link`` the only extra work is one ``is None`` check per send and
    per tick.
    """

    _WAIT_FOR_SYNC = frozenset({"next_node_idx"})
    DELAYED_MAX = 10_000  # held messages per transport (a count: one can be ~1 MiB)

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any,
                 journal: DurableJournal,
                 link: Callable[[str], float | None] | None = None) -> None:
        self._journal = journal
        self._outbox: list[tuple[Any, Any]] = []
        self._outbox_lock = threading.Lock()
        self._link = link
        # Fault injection only (guarded by _outbox_lock, used on the tick thread):
        self._delayed: dict[Any, collections.deque[tuple[float, Any]]] = {}
        self._delayed_count = 0
        self._waker: _Waker | None = None
        self.dropped_cut_out = 0
        self.dropped_cut_in = 0
        self.dropped_overflow = 0
        super().__init__(syncObj, selfNode, otherNodes)
        syncObj.addOnTickCallback(self.flush)

    def send(self, node: Any, message: Any) -> bool:
        with self._outbox_lock:
            if self._outbox or (self._journal.unsynced
                                and message.get("type") in self._WAIT_FOR_SYNC):
                self._outbox.append((node, message))
                return True
            if self._link is not None:
                return self._send_over_link(node, message)
            return bool(super().send(node, message))

    def _onMessageReceived(self, node: Any, message: Any) -> None:
        if self._link is not None and self._link(str(node.id)) is None:
            self.dropped_cut_in += 1
            return
        super()._onMessageReceived(node, message)
        kept = self._journal.settle()
        if kept:
            reapply_membership(self._syncObj, kept)

    def flush(self) -> None:
        self._journal.sync()  # the leader's own entries, before its next commit count
        if self._link is not None:
            self._flush_over_link()
            return
        with self._outbox_lock:
            if not self._outbox:
                return
            outbox, self._outbox = self._outbox, []
            for node, message in outbox:
                super().send(node, message)

    def destroy(self) -> None:
        if self._waker is not None:
            self._waker.stop()
        super().destroy()

    # -- fault injection (only with a link; caller holds _outbox_lock) ---------------

    def _send_over_link(self, node: Any, message: Any) -> bool:
        assert self._link is not None
        delay = self._link(str(node.id))
        if delay is None:
            self.dropped_cut_out += 1
            return True
        held = self._delayed.get(node)
        if delay <= 0 and not held:
            return bool(super().send(node, message))
        if self._delayed_count >= self.DELAYED_MAX:
            self.dropped_overflow += 1
            return True
        due = time.monotonic() + max(delay, 0.0)
        if held is None:
            held = self._delayed[node] = collections.deque()
        elif held and held[-1][0] > due:
            due = held[-1][0]  # never overtake an earlier message to this peer
        held.append((due, message))
        self._delayed_count += 1
        if self._waker is None:
            self._waker = _Waker(self._syncObj)
        self._waker.wake_at(due)
        return True

    def _flush_over_link(self) -> None:
        with self._outbox_lock:
            if self._outbox:
                outbox, self._outbox = self._outbox, []
                for node, message in outbox:
                    self._send_over_link(node, message)
            if self._delayed_count:
                self._release_due()

    def _release_due(self) -> None:
        assert self._link is not None
        now = time.monotonic()
        next_due: float | None = None
        for node, held in self._delayed.items():
            while held and held[0][0] <= now:
                _, message = held.popleft()
                self._delayed_count -= 1
                if self._link(str(node.id)) is None:
                    self.dropped_cut_out += 1
                else:
                    super().send(node, message)
            if held and (next_due is None or held[0][0] < next_due):
                next_due = held[0][0]
        if next_due is not None and self._waker is not None:
            self._waker.wake_at(next_due)


class _Waker:
    """One daemon thread per faulty transport: at the earliest due time of a
    held message it wakes pysyncobj's tick thread, which otherwise sleeps in
    ``poll`` for up to the tick period. The wakeup is pysyncobj's own pipe
    notifier (the one ``_applyCommand`` uses); where it does not exist, held
    messages leave at the next tick instead. Only a weak reference to the
    notifier is kept, so the thread never keeps a SyncObj alive; it exits on
    ``stop`` or when the notifier is gone."""

    _IDLE_CHECK_S = 1.0

    def __init__(self, sync_obj: Any) -> None:
        notifier = getattr(sync_obj, "_SyncObj__pipeNotifier", None)
        self._notifier = None if notifier is None else weakref.ref(notifier)
        self._cond = threading.Condition()
        self._due: float | None = None
        self._stopped = False
        if self._notifier is not None:
            threading.Thread(target=self._run, name="raft-fault-waker", daemon=True).start()

    def wake_at(self, due: float) -> None:
        """Wake the tick thread at ``due`` (time.monotonic) or earlier."""
        if self._notifier is None:
            return
        with self._cond:
            if self._due is None or due < self._due:
                self._due = due
                self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        assert self._notifier is not None
        while True:
            with self._cond:
                while not self._stopped:
                    if self._due is None:
                        self._cond.wait(self._IDLE_CHECK_S)
                        if self._notifier() is None:
                            return
                        continue
                    remaining = self._due - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if self._stopped:
                    return
                self._due = None
            notifier = self._notifier()
            if notifier is None:
                return
            with contextlib.suppress(OSError):  # a full pipe: a wakeup is pending anyway
                notifier.notify()


def reapply_membership(sync_obj: Any, kept: list[tuple[bytes, int, int]]) -> int:
    """Before "deleting" a log tail, pysyncobj reverses the membership changes
    in it. The DurableJournal keeps entries that do not conflict, so their
    changes are applied again here, in log order. Returns how many there were."""
    parse = sync_obj._SyncObj__parseChangeClusterRequest
    change = sync_obj._SyncObj__doChangeCluster
    count = 0
    for command, _, _ in kept:
        request = parse(command)
        if request is not None:
            change(request)
            count += 1
    return count


# -- settings ---------------------------------------------------------------------

@dataclass(frozen=True)
class RaftSettings:
    """Every pysyncobj knob the project sets, with units in the names."""

    election_timeout_s_min: float = 0.8
    election_timeout_s_max: float = 1.6
    heartbeat_period_s: float = 0.1
    tick_period_s: float = 0.05
    connection_timeout_s: float = 2.0
    connection_retry_s: float = 0.5
    leader_fallback_timeout_s: float = 2.0
    commands_queue_max: int = 100_000
    append_entries_bytes_max: int = 1 << 20
    socket_buffer_bytes: int = 1 << 20
    log_compaction_entries_min: int = 20_000
    # pysyncobj counts entries only; one entry can batch thousands of commands,
    # so the journal (held in memory too) is also compacted past this size.
    log_compaction_bytes_max: int = 64 * 1024 * 1024
    log_compaction_period_s: float = 600.0
    snapshot_chunk_bytes: int = 1 << 20


def make_conf(settings: RaftSettings, secret: str, journal_key: str, dump_file: str,
              replica: Replica) -> SyncObjConf:
    """Every SyncObjConf option, set in one place."""
    return SyncObjConf(
        password=secret,
        autoTick=True,
        autoTickPeriod=settings.tick_period_s,
        commandsQueueSize=settings.commands_queue_max,
        raftMinTimeout=settings.election_timeout_s_min,
        raftMaxTimeout=settings.election_timeout_s_max,
        appendEntriesPeriod=settings.heartbeat_period_s,
        connectionTimeout=settings.connection_timeout_s,
        connectionRetryTime=settings.connection_retry_s,
        leaderFallbackTimeout=settings.leader_fallback_timeout_s,
        # Commands are batched by the node server; pysyncobj sends each entry at
        # once (low latency) instead of waiting for its next heartbeat.
        appendEntriesUseBatch=False,
        appendEntriesBatchSizeBytes=settings.append_entries_bytes_max,
        # Without it pysyncobj binds 0.0.0.0: every interface would reach Raft.
        bindAddress=replica.self_address,
        preferredAddrType="ipv4",
        sendBufferSize=settings.socket_buffer_bytes,
        recvBufferSize=settings.socket_buffer_bytes,
        logCompactionMinEntries=settings.log_compaction_entries_min,
        logCompactionMinTime=settings.log_compaction_period_s,
        logCompactionSplit=False,
        logCompactionBatchSize=settings.snapshot_chunk_bytes,
        commandsWaitLeader=False,
        fullDumpFile=dump_file,
        journalFile=journal_key,
        dynamicMembershipChange=True,
        pollerType="auto",
        useFork=False,
        serializer=replica._serialize,
        serializeChecker=replica._serialize_state,
        deserializer=replica._deserialize,
        onStateChanged=None,
        onReady=None,
    )


class _DumpInBackground(Exception):
    """Raised from the serializer so pysyncobj does not rename a placeholder over
    the last good dump; the background thread writes and renames the dump and
    ``_serialize_state`` reports the outcome."""


class _Group(SyncObj):  # type: ignore[misc]
    def __init__(self, replica: Replica, self_address: str, peers: list[str],
                 conf: SyncObjConf, transport_class: Any) -> None:
        self._replica = replica
        super().__init__(self_address, peers, conf=conf, transportClass=transport_class)

    @replicated  # type: ignore[untyped-decorator]
    def apply_entry(self, payload: bytes) -> Any:
        # pysyncobj applies entries in order and advances raftLastApplied after
        # this returns, so this entry's index is raftLastApplied + 1.
        return self._replica._apply(self.raftLastApplied + 1, payload, self)


class Replica:
    """A physical shard's replica on this node."""

    def __init__(
        self,
        shard_id: int,
        directory: Path,
        self_address: str,
        peer_addresses: list[str],
        secret: str,
        *,
        settings: RaftSettings | None = None,
        sync_fn: Callable[[int], None] = os.fdatasync,
        exit_fn: Callable[[int], None] = os._exit,
        apply_fn: ApplyFn = apply_entry,
        link: Callable[[str], float | None] | None = None,
    ) -> None:
        """``link``, for fault injection (DESIGN section 8): given a peer's Raft
        address ``host:port``, ``None`` if the link to it is cut, else the one-way
        delay in seconds. Called per message on the Raft thread (and again when a
        held message is released), so it must be cheap, must not block and must
        not raise; see ``_DurableTransport``."""
        self.shard_id = shard_id
        self._apply_fn = apply_fn
        self.directory = Path(directory)
        self.self_address = self_address
        self.settings = settings or RaftSettings()
        self._exit = exit_fn
        self.directory.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.directory / "state")
        self.journal = DurableJournal(self.directory / "journal", sync_fn=sync_fn,
                                      on_conflict=self._on_log_conflict)
        self._dump_path = self.directory / "snapshot.dump"
        self._dump_state = SERIALIZER_STATE.NOT_SERIALIZING
        self._dump_lock = threading.Lock()
        self.snapshots_written = 0
        self.snapshots_installed = 0
        self._compaction_forced = False
        journal_key = str(self.directory / "journal")
        with _journals_lock:
            _pending_journals[journal_key] = self.journal
        conf = make_conf(self.settings, secret, journal_key, str(self._dump_path), self)
        transport = functools.partial(_DurableTransport, journal=self.journal, link=link)
        self._group = _Group(self, self_address, peer_addresses, conf, transport)
        # pysyncobj stops its tick thread once the thread that created the SyncObj
        # exits. A node opens replicas from worker threads (which come and go), so
        # tie the replica's life to the process's main thread instead.
        self._group._SyncObj__mainThread = threading.main_thread()

    # -- the apply path (Raft thread) ------------------------------------------

    def _apply(self, index: int, payload: bytes, group: SyncObj) -> Any:
        try:
            # A lone replica acks after apply with no message in between.
            self.journal.sync()
            if index <= self.store.applied_index:
                return None  # replay of an entry already in LevelDB
            out = self._apply_fn(self.store, index, payload)
            self.store.write(out.writes)
            if (self.journal.bytes > self.settings.log_compaction_bytes_max
                    and not self._compaction_forced):
                self._compaction_forced = True
                group.forceLogCompaction()  # (self._group is unset during replay at start)
            if out.error is not None:
                log.error("shard %d: %s", self.shard_id, out.error)
                return {"error": out.error}
            return out.results
        except BaseException:
            log.critical("shard %d: cannot apply entry %d; stopping the node so the "
                         "journal is replayed on restart", self.shard_id, index, exc_info=True)
            self._exit(EXIT_APPLY_FAILED)
            raise

    def _on_log_conflict(self, index: int) -> None:
        if index <= self.store.applied_index:
            log.critical("shard %d: the leader replaces applied log entry %d; replicas "
                         "have diverged, stopping", self.shard_id, index)
            self._exit(EXIT_APPLIED_ENTRY_REPLACED)

    # -- submitting --------------------------------------------------------------

    def submit(self, payload: bytes, on_done: OnDone) -> None:
        """Propose ``payload`` (encoded commands). ``on_done(results, error)`` is
        called exactly once, on the Raft thread or, for an immediate refusal,
        on the caller's thread. It must not block."""

        def callback(result: Any, reason: int) -> None:
            try:
                if reason == FAIL_REASON.SUCCESS:
                    on_done(result, None)
                else:
                    on_done(None, error_for_fail_reason(reason, self.leader_address))
            except BaseException:
                log.exception("shard %d: result callback failed", self.shard_id)

        if not self._group._isLeader():
            callback(None, FAIL_REASON.NOT_LEADER)
            return
        self._group.apply_entry(payload, callback=callback)

    # -- state ---------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        return bool(self._group._isLeader())

    @property
    def leader_address(self) -> str | None:
        """Raft address of the leader this replica knows of."""
        leader = self._group._getLeader()
        return None if leader is None else str(leader.address)

    @property
    def term(self) -> int:
        return int(self._group.raftCurrentTerm)

    @property
    def commit_index(self) -> int:
        return int(self._group.raftCommitIndex)

    @property
    def last_applied(self) -> int:
        return int(self._group.raftLastApplied)

    def transfer_leadership(self, address: str | None = None) -> None:
        """Ask this leader to hand leadership to the replica at ``address`` (Raft
        TimeoutNow); best effort, refused unless that replica has caught up."""
        def callback(_result: Any, reason: int) -> None:
            if reason != FAIL_REASON.SUCCESS:
                log.info("shard %d: leadership transfer to %s refused (%d)",
                         self.shard_id, address, reason)

        self._group.transferLeadership(address, callback=callback)

    def destroy(self) -> None:
        """Stop the Raft thread and close files."""
        self._group.destroy()
        thread = getattr(self._group, "_SyncObj__thread", None)
        if thread is not None:
            thread.join(timeout=10)
        self.store.close()

    # -- snapshots -------------------------------------------------------------

    def _serialize(self, _tmp_file: str, data: Any) -> None:
        """Called on the Raft thread with (last applied entry, previous, cluster)."""
        last_entry, prev_entry, cluster = data
        meta = {
            "last": list(last_entry),
            "prev": list(prev_entry),
            "cluster": sorted(str(node.address) for node in cluster),
        }
        applied, pairs = self.store.begin_dump()
        with self._dump_lock:
            self._dump_state = SERIALIZER_STATE.SERIALIZING
        threading.Thread(
            target=self._dump_in_background, args=(meta, applied, pairs),
            name=f"dump-shard-{self.shard_id}", daemon=True,
        ).start()
        raise _DumpInBackground

    def _dump_in_background(self, meta: dict[str, Any], applied: int, pairs: Any) -> None:
        tmp = self._dump_path.with_name(self._dump_path.name + ".bg")
        state = SERIALIZER_STATE.FAILED
        try:
            with open(tmp, "wb") as out:
                write_snapshot(out, meta, applied, pairs)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self._dump_path)
            fsync_dir(self._dump_path.parent)
            self.snapshots_written += 1
            state = SERIALIZER_STATE.SUCCESS
        except Exception:
            log.warning("shard %d: snapshot dump failed", self.shard_id, exc_info=True)
        finally:
            with self._dump_lock:
                self._dump_state = state

    def _serialize_state(self) -> int:
        with self._dump_lock:
            state = self._dump_state
            if state in (SERIALIZER_STATE.SUCCESS, SERIALIZER_STATE.FAILED):
                self._dump_state = SERIALIZER_STATE.NOT_SERIALIZING
                self._compaction_forced = False
            return int(state)

    def _deserialize(self, file_name: str) -> tuple[Any, Any, list[str]]:
        """At start, and when a snapshot from the leader was received."""
        try:
            with SnapshotReader(Path(file_name)) as reader:
                meta = reader.meta
                if reader.applied > self.store.applied_index:
                    with open(file_name, "rb") as received:
                        os.fsync(received.fileno())
                    fsync_dir(Path(file_name).parent)
                    self.store.replace_from(reader.pairs())
                    self.snapshots_installed += 1
            last = (bytes(meta["last"][0]), int(meta["last"][1]), int(meta["last"][2]))
            prev = (bytes(meta["prev"][0]), int(meta["prev"][1]), int(meta["prev"][2]))
            position = self.journal.position_of(prev)
            if position:
                # The crash window: the dump was written but the journal not yet
                # truncated. Drop only the covered prefix so pysyncobj keeps the tail.
                self.journal.deleteEntriesTo(position)
            cluster = [a for a in meta["cluster"] if a != self.self_address]
            return last, prev, cluster
        except BaseException:
            log.critical("shard %d: cannot load snapshot %s; stopping", self.shard_id,
                         file_name, exc_info=True)
            self._exit(EXIT_SNAPSHOT_LOAD_FAILED)
            raise
