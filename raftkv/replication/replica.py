"""One replica of a physical shard: a pysyncobj group member over a LevelDB Store.

This is the only module that imports pysyncobj. It adds what pysyncobj lacks
(DESIGN section 5):

- durability: a ``GroupJournal`` in the process's shared ``NodeLog``
  (``journal.py``), and a transport that lets no ack leave the
  process before the entries it covers are synced; a lone replica syncs
  before it applies;
- one Raft thread and one connection per peer process for all the groups of a
  process (``hub.py``): pysyncobj runs with ``autoTick`` off, its messages go
  through the process's ``RaftHub``, its poller is a stub the hub drives,
  and a proposal from another thread wakes the hub (``_HubNotifier``), not a
  pipe of the group's;
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
- encrypted, authenticated Raft traffic (AES-GCM per frame, keys from the
  cluster secret; ``wire.py``), authenticated before anything is unpickled,
  on a listener bound to the configured address only.

"The Raft thread" below is the hub's thread.

Results reach the caller through ``submit(payload, on_done)``; ``on_done`` runs
on the Raft thread and must hand off (the node server uses a ``hub.Relay``
to its trio loop: one wake-up per hub round).
"""

from __future__ import annotations

import collections
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pysyncobj.syncobj as _pysyncobj_core
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, replicated
from pysyncobj.config import SERIALIZER_STATE
from pysyncobj.poller import Poller
from pysyncobj.transport import Transport

from raftkv.errors import (
    InternalError,
    NotLeader,
    OutcomeUnknown,
    Overloaded,
    RaftKVError,
    Unavailable,
)
from raftkv.replication.hub import RaftHub
from raftkv.replication.journal import GroupJournal, NodeLog
from raftkv.replication.readindex import ReadIndex
from raftkv.replication.settings import RaftSettings
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
EXIT_SYNC_FAILED = 73


class _ResendFilter(logging.Filter):
    """pysyncobj logs CRITICAL for every resent append-entries that overlaps
    applied entries. The GroupJournal keeps identical entries (no data is
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
_pending_journals: dict[str, GroupJournal] = {}
_original_create_journal = _pysyncobj_core.createJournal


def _create_journal(journal_file: str | None) -> Any:
    with _journals_lock:
        journal = _pending_journals.pop(journal_file, None) if journal_file else None
    if journal is not None:
        return journal
    return _original_create_journal(journal_file)


_pysyncobj_core.createJournal = _create_journal


class _GroupPoller(Poller):  # type: ignore[misc]
    """The poller pysyncobj gets for one group. ``poll`` does nothing: the hub
    polls. Nothing subscribes to it: pysyncobj's only file, the pipe that
    wakes a tick when another thread proposes, is replaced by ``_HubNotifier``."""

    def __init__(self, hub: RaftHub) -> None:
        self._hub = hub
        self.member: _HubTransport | None = None
        self._touch_queued = False

    def subscribe(self, descr: int, callback: Callable[[int, int], None], eventMask: int) -> None:
        raise RuntimeError(f"a Raft group has no file of its own to poll (fd {descr})")

    def unsubscribe(self, descr: int) -> None:
        return None

    def poll(self, timeout: float) -> None:
        return None

    def touch_soon(self) -> None:
        """Tick the group in the hub's next round (from any thread)."""
        if self._hub.on_hub_thread():
            self._hub.touch(self.member)
        elif not self._touch_queued:
            self._touch_queued = True
            self._hub.call_soon(self._touch)

    def _touch(self) -> None:
        self._touch_queued = False  # before the tick that takes the commands queued so far
        self._hub.touch(self.member)


class _HubNotifier:
    """What pysyncobj calls after another thread queued a command: instead of
    a pipe per group (a write, an epoll wake-up and two reads per entry), the
    group is touched on the hub, and proposals queued before the hub gets to
    them share one wake of its thread."""

    def __init__(self, poller: _GroupPoller) -> None:
        self._poller = poller

    def notify(self) -> None:
        self._poller.touch_soon()


_original_pipe_notifier = _pysyncobj_core.PipeNotifier


def _create_notifier(poller: Any, callback: Any = None) -> Any:
    if isinstance(poller, _GroupPoller) and callback is None:
        return _HubNotifier(poller)
    return _original_pipe_notifier(poller, callback)


_pysyncobj_core.PipeNotifier = _create_notifier

_original_create_poller = _pysyncobj_core.createPoller


def _create_poller(poller_type: Any) -> Any:
    """``SyncObjConf.pollerType`` may be a ready poller (a ``_GroupPoller``)."""
    if isinstance(poller_type, Poller):
        return poller_type
    return _original_create_poller(poller_type)


_pysyncobj_core.createPoller = _create_poller


class _HubTransport(Transport):  # type: ignore[misc]
    """One group's transport: its messages go through the process's ``RaftHub``.

    **Durability.** No acknowledgement of log entries leaves before those
    entries are synced. A follower's ``next_node_idx`` (its ack) is queued as
    *late* while the journal holds unsynced entries: the hub sends late
    messages only after this round's journal syncs, one sync covering every
    entry appended in the round (group commit). A leader's append-entries are
    *early* and go out before its own sync, so followers write in parallel
    with the leader (as Raft allows): the leader counts its own log toward a
    commit only in its next tick, after this round's sync. Once one message
    of the group is late, the rest of its round is late too, so messages
    never overtake each other.

    **Fault injection** (DESIGN section 8), only when ``link`` is given.
    ``link(peer_address)`` says, per message, whether the link to that peer
    is cut (``None``) or else the one-way delay in seconds:

    - a message to a cut peer is dropped where it would leave the group, and
      ``send`` reports success, as a lost packet would; a message from a cut
      peer is dropped on arrival, before pysyncobj or the journal sees it;
    - a delayed message is held in a per-peer queue, in order, and handed to
      the hub at its due time (the hub wakes for it). A message never
      overtakes an earlier one to the same peer, even when the delay shrinks.
      A held message whose link is cut by its due time is dropped (it was
      "on the wire");
    - at most ``DELAYED_MAX`` messages are held; beyond that new messages are
      dropped (a full network buffer), which Raft recovers from by resending.

    Everything runs on the hub thread; a ``send`` from another thread is
    moved there.
    """

    _WAIT_FOR_SYNC = frozenset({"next_node_idx"})
    DELAYED_MAX = 10_000  # held messages per transport (a count: one can be ~1 MiB)

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any, *, hub: RaftHub,
                 journal: GroupJournal, on_sync_failed: Callable[[int], None],
                 link: Callable[[str], float | None] | None = None) -> None:
        super().__init__(syncObj, selfNode, otherNodes)
        self._on_sync_failed = on_sync_failed
        self._syncObj = syncObj
        self._hub = hub
        self._journal = journal
        self._link = link
        self.address = str(selfNode.address)
        self._nodes: dict[str, Any] = {}  # peer address -> pysyncobj node
        self.reads = ReadIndex()  # strong reads pending at this leader (readindex.py)
        self.on_reads: Callable[[], None] | None = None  # acks or ticks may serve some
        self._round_open = False  # a read round started, its probes not yet sent
        self._stamped: set[str] = set()  # the peers that got the open round
        self._attached = False
        self._late = False  # a message of this round waits for the sync
        self._delayed: dict[str, collections.deque[tuple[float, Any]]] = {}
        self._delayed_count = 0
        self.dropped_cut_out = 0
        self.dropped_cut_in = 0
        self.dropped_overflow = 0
        for node in otherNodes:
            self.addNode(node)

    # -- pysyncobj's Transport -------------------------------------------------------

    def addNode(self, node: Any) -> None:
        self._nodes[str(node.address)] = node
        if self._attached:
            self._hub.peers_changed()
            if self._hub.is_up(self._hub.route(str(node.address))):
                self._onNodeConnected(node)

    def dropNode(self, node: Any) -> None:
        if self._nodes.pop(str(node.address), None) is not None:
            self._onNodeDisconnected(node)
            self._hub.peers_changed()

    def send(self, node: Any, message: Any) -> bool:
        if not self._hub.on_hub_thread():
            self._hub.call_soon(lambda: self.send(node, message))
            return True
        if self.reads.pending and message.get("type") == "append_entries":
            # Asks the follower to confirm this leadership (a read_ack): see readindex.py.
            message["ri"] = self.reads.started
            if self._round_open:
                self._stamped.add(str(node.address))
        late = self._late or (message.get("type") in self._WAIT_FOR_SYNC
                              and self._journal.unsynced)
        self._late = late
        address = str(node.address)
        if self._link is not None:
            return self._send_over_link(address, message, late)
        return self._hand(address, message, late)

    def _hand(self, address: str, message: Any, late: bool) -> bool:
        """Give a message to the hub: the point where it leaves the group."""
        hub_address = self._hub.route(address)
        if hub_address is None:
            return False
        self._hub.enqueue(hub_address, (address, self.address, message), late)
        return self._hub.is_up(hub_address)

    # -- the hub's member ------------------------------------------------------------

    def attached(self) -> None:
        self._attached = True

    def peer_addresses(self) -> list[str]:
        return list(self._nodes)

    def peer_link(self, hub_address: str, up: bool) -> None:
        for address, node in list(self._nodes.items()):
            if self._hub.route(address) == hub_address:
                if up:
                    self._onNodeConnected(node)
                else:
                    self._onNodeDisconnected(node)

    def deliver(self, source: str, message: Any) -> bool:
        """Hand a peer's message to the group; True if the group must tick
        for it (a read round's probe or ack leaves pysyncobj's state alone)."""
        if self._link is not None and self._link(source) is None:
            self.dropped_cut_in += 1
            return False
        node = self._nodes.get(source)
        if node is None:
            return False  # not (or no longer) a member of this group
        kind = message.get("type")
        if kind == "read_ack":
            self.reads.ack(source, message["ri"], message["term"])
            if self.on_reads is not None:
                self.on_reads()
            return False
        if kind == "read_probe":
            self._confirm_leader(node, message)
            return False
        self._onMessageReceived(node, message)
        kept = self._journal.settle()
        if kept:
            reapply_membership(self._syncObj, kept)
        if kind == "append_entries" and "ri" in message:
            self._confirm_leader(node, message)
        return True

    def _confirm_leader(self, node: Any, message: dict[str, Any]) -> None:
        """Tell the leader whose heartbeat or probe this was that this member
        follows it in its term (only then: a member of a later term, or one
        that has not yet heard from this leader, must not confirm it). The
        answer acknowledges no entries, so it need not wait for the journal's
        sync."""
        term = message["term"]
        leader = self._syncObj._getLeader()
        if self._syncObj.raftCurrentTerm != term or leader is None \
                or str(leader.address) != str(node.address):
            return
        self._send_own(str(node.address), {"type": "read_ack", "ri": message["ri"],
                                           "term": term})

    def _send_own(self, address: str, message: dict[str, Any]) -> None:
        """Send a message of the read rounds' own (not pysyncobj's)."""
        if self._link is not None:
            self._send_over_link(address, message, False)
        else:
            self._hand(address, message, False)

    def open_round(self) -> None:
        """A read round was started (on the hub thread, before the round's
        ticks): it goes out on this round's append-entries (writes in flight
        carry it at no cost), and once the round's groups have ticked,
        ``_probe_unstamped`` probes the peers it has not reached. The group
        itself need not tick for it."""
        self._round_open = True
        self._stamped = set()
        self._hub.at_round_end(self._probe_unstamped)

    def tick(self) -> None:
        self._syncObj.doTick(0.0)
        if self.reads.pending and self.on_reads is not None:
            self.on_reads()  # the commit or apply may have advanced, or the term changed

    def _probe_unstamped(self) -> None:
        """The open read round to every peer no append-entries carried it to
        this round: a probe of its own, which a follower answers with a
        read_ack (``_confirm_leader``) and which, unlike an append-entries,
        costs neither side pysyncobj's processing nor an answer of its own."""
        if not self._round_open:
            return
        self._round_open = False
        term = self.reads.term
        if term is None or not self._syncObj._isLeader() \
                or self._syncObj.raftCurrentTerm != term:
            return  # serving fails the round's reads (the term changed)
        probe = {"type": "read_probe", "ri": self.reads.started, "term": term}
        for address in self._nodes:
            if address not in self._stamped:
                self._send_own(address, probe)

    @property
    def has_peers(self) -> bool:
        return bool(self._nodes)

    @property
    def unsynced(self) -> bool:
        return bool(self._journal.unsynced)

    def sync(self) -> None:
        try:
            self._journal.sync()
        except BaseException:
            # A failed fdatasync may have lost the pages it was given, and a
            # retry can "succeed" without them: stop, and replay on restart.
            log.critical("%s: journal sync failed; stopping the node", self.address,
                         exc_info=True)
            self._on_sync_failed(EXIT_SYNC_FAILED)
            raise

    def end_round(self) -> None:
        self._late = False

    # -- fault injection (only with a link) ----------------------------------------------

    def _send_over_link(self, address: str, message: Any, late: bool) -> bool:
        assert self._link is not None
        delay = self._link(address)
        if delay is None:
            self.dropped_cut_out += 1
            return True
        held = self._delayed.get(address)
        if delay <= 0 and not held:
            return self._hand(address, message, late)
        if self._delayed_count >= self.DELAYED_MAX:
            self.dropped_overflow += 1
            return True
        due = time.monotonic() + max(delay, 0.0)
        if held is None:
            held = self._delayed[address] = collections.deque()
        elif held and held[-1][0] > due:
            due = held[-1][0]  # never overtake an earlier message to this peer
        held.append((due, message))
        self._delayed_count += 1
        self._hub.wake_at(self, due)
        return True

    def release_due(self, now: float) -> float | None:
        """Hand the held messages that are due to the hub; the next due time."""
        assert self._link is not None
        next_due: float | None = None
        for address, held in self._delayed.items():
            while held and held[0][0] <= now:
                _, message = held.popleft()
                self._delayed_count -= 1
                if self._link(address) is None:
                    self.dropped_cut_out += 1
                else:
                    # Held since an earlier round, whose sync has run.
                    self._hand(address, message, False)
            if held and (next_due is None or held[0][0] < next_due):
                next_due = held[0][0]
        return next_due


def reapply_membership(sync_obj: Any, kept: list[tuple[bytes, int, int]]) -> int:
    """Before "deleting" a log tail, pysyncobj reverses the membership changes
    in it. The GroupJournal keeps entries that do not conflict, so their
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

def make_conf(settings: RaftSettings, journal_key: str, dump_file: str,
              replica: Replica, poller: _GroupPoller) -> SyncObjConf:
    """Every SyncObjConf option, set in one place."""
    return SyncObjConf(
        # The hub encrypts and authenticates Raft traffic (wire.py), once per
        # frame for every group instead of once per message.
        password=None,
        # The hub's one thread ticks every group of the process.
        autoTick=False,
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
        # Not used (the hub listens), but never let pysyncobj bind 0.0.0.0.
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
        pollerType=poller,
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
                 conf: SyncObjConf, transport_class: Any, *, founding: bool = False) -> None:
        self._replica = replica
        super().__init__(self_address, peers, conf=conf, transportClass=transport_class)
        if founding and self._SyncObj__raftCurrentTerm == 0 \
                and len(self._SyncObj__raftLog) == 1:
            # Nothing has happened in this group yet (no term, only pysyncobj's
            # first no-op entry): no leader to wait for, so a short first timeout.
            settings = replica.settings
            jitter_s = random.uniform(  # noqa: S311 - election jitter, not a secret
                settings.first_election_timeout_s_min, settings.first_election_timeout_s_max)
            self._SyncObj__raftElectionDeadline = _pysyncobj_core.monotonicTime() + jitter_s

    APPLY_TICK_S_MAX = 0.02  # apply work per tick, before the rest of the round goes on
    APPLY_STEP_ENTRIES = 8

    def _SyncObj__applyLogEntries(self) -> bool:
        """pysyncobj's apply loop, with two changes:

        - no request to send append-entries right after every apply (only to
          tell followers the new commit index): that doubled the messages per
          entry. Followers learn the commit index from the next append-entries
          or heartbeat; clients are answered by the leader, which applies at once;
        - at most about ``APPLY_TICK_S_MAX`` of applying per tick, the rest in
          the next rounds: pysyncobj applies every committed entry at once, and
          a replica that learns of a long committed backlog (a restarted one,
          or a leader elected behind its commit hint) held its hub, and so the
          heartbeats of every group of its process, for seconds: followers
          started elections and discarded what it had just proposed."""
        commit = int(getattr(self, "_SyncObj__raftCommitIndex"))  # noqa: B009 (mypy)
        if commit - self._SyncObj__raftLastApplied <= self.APPLY_STEP_ENTRIES:
            SyncObj._SyncObj__applyLogEntries(self)
            return False
        deadline = time.monotonic() + self.APPLY_TICK_S_MAX
        try:
            while self._SyncObj__raftLastApplied < commit and time.monotonic() < deadline:
                self._SyncObj__raftCommitIndex = min(
                    commit, self._SyncObj__raftLastApplied + self.APPLY_STEP_ENTRIES)
                SyncObj._SyncObj__applyLogEntries(self)
        finally:
            self._SyncObj__raftCommitIndex = commit
        if self._SyncObj__raftLastApplied < commit:
            self._replica.more_to_apply()
        return False

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
        hub: RaftHub | None = None,
        wal: NodeLog | None = None,
        client_address_of: Callable[[str], str | None] | None = None,
        founding: bool = False,
    ) -> None:
        """``hub``: the process's Raft transport, shared by all its replicas;
        without one the replica gets its own, listening on ``self_address``
        (and closes it on ``destroy``). ``wal``: the process's Raft log, shared
        likewise (``sync_fn`` is then the log's); without one the replica keeps
        its own in ``directory/wal``.

        ``link``, for fault injection (DESIGN section 8): given a peer's Raft
        address ``host:port``, ``None`` if the link to it is cut, else the one-way
        delay in seconds. Called per message on the hub thread (and again when a
        held message is released), so it must be cheap, must not block and must
        not raise; see ``_HubTransport``.

        ``founding``: this replica is one of a new group's first members, all
        starting empty at about the same time (a new keyspace's or reshard's
        groups, the shard manager's at first start). If it is empty, its first
        election timeout is ``settings.first_election_timeout_s_*`` (0.15-0.35 s)
        instead of 0.8-1.6 s. Not for a replica added to a serving group: there
        is a leader to wait for, and every candidacy before that leader reaches
        it raises the empty replica's term (pysyncobj has no pre-vote); once
        past the leader's term, it would depose it."""
        self.shard_id = shard_id
        self._client_address_of = client_address_of
        self._apply_fn = apply_fn
        self.directory = Path(directory)
        self.self_address = self_address
        self.settings = settings or RaftSettings()
        self._exit = exit_fn
        self.directory.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.directory / "state")
        self._own_log = wal is None
        try:
            self.wal, self.journal = self._open_journal(wal, sync_fn)
        except BaseException:
            self.store.close()
            raise
        self._dump_path = self.directory / "snapshot.dump"
        self._dump_state = SERIALIZER_STATE.NOT_SERIALIZING
        self._dump_lock = threading.Lock()
        self.snapshots_written = 0
        self.snapshots_installed = 0
        self._compaction_forced = False
        journal_key = str(self.directory / "journal")
        with _journals_lock:
            _pending_journals[journal_key] = self.journal
        self._own_hub = hub is None
        self.hub = hub if hub is not None else RaftHub(
            self_address, secret, tick_period_s=self.settings.tick_period_s,
            connection_retry_s=self.settings.connection_retry_s,
            connection_timeout_s=self.settings.connection_timeout_s,
            name=f"raft-hub-{self_address}")
        self._poller = _GroupPoller(self.hub)
        conf = make_conf(self.settings, journal_key, str(self._dump_path), self, self._poller)
        made: list[_HubTransport] = []

        def make_transport(sync_obj: Any, self_node: Any, other_nodes: Any) -> _HubTransport:
            made.append(_HubTransport(sync_obj, self_node, other_nodes, hub=self.hub,
                                      journal=self.journal, on_sync_failed=exit_fn,
                                      link=link))
            return made[-1]

        try:
            self._group = _Group(self, self_address, peer_addresses, conf, make_transport,
                                 founding=founding)
            self.transport = made[0]
            self.transport.on_reads = self._serve_reads
            self._read_round_queued = False
            self._committed_in_term: int | None = None  # a term whose entry is committed
            self._poller.member = self.transport
            self.transport.attached()
            self.hub.add(self.transport)
        except BaseException:
            if self._own_hub:
                self.hub.close()
            with _journals_lock:
                _pending_journals.pop(journal_key, None)
            self._close_log()
            self.store.close()
            raise

    def _open_journal(self, wal: NodeLog | None, sync_fn: Callable[[int], None]
                      ) -> tuple[NodeLog, GroupJournal]:
        """This group's journal in the process's log, or in a log of its own."""
        log_ = wal if wal is not None else NodeLog(self.directory / "wal", sync_fn=sync_fn)
        try:
            return log_, log_.open_group(self.directory / "journal",
                                         on_conflict=self._on_log_conflict)
        except BaseException:
            if wal is None:
                log_.close()
            raise

    def more_to_apply(self) -> None:
        """The group applied part of its committed entries: tick it again soon."""
        transport = getattr(self, "transport", None)  # (unset while the group is built)
        if transport is not None:
            self.hub.touch(transport)

    def _close_log(self) -> None:
        """Close this group in the log (and the log, if it is this replica's own)."""
        self.journal.close()
        if self._own_log:
            self.wal.close()

    # -- the apply path (Raft thread) ------------------------------------------

    def _apply(self, index: int, payload: bytes, group: SyncObj) -> Any:
        try:
            if not self.transport.has_peers:
                # A lone replica commits on its own journal, with no message (and
                # so no round of the hub) in between. With peers, a commit already
                # means a majority has the entry on disk, counting this replica
                # only after its sync (see _HubTransport).
                self.journal.sync()
            if index <= self.store.applied_index:
                return None  # replay of an entry already in LevelDB
            out = self._apply_fn(self.store, index, payload)
            self.store.write(out.writes)
            if (self.journal.size_bytes > self.settings.log_compaction_bytes_max
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

    def leader_hint(self) -> str | None:
        """The leader's client address, for a NOT_LEADER answer; None when
        unknown. (Its Raft address is no use to a client: that port speaks
        the Raft hub's protocol.)"""
        leader = self.leader_address
        if leader is None or self._client_address_of is None:
            return None
        return self._client_address_of(leader)

    def submit(self, payload: bytes, on_done: OnDone) -> None:
        """Propose ``payload`` (encoded commands). ``on_done(results, error)`` is
        called exactly once, on the Raft thread or, for an immediate refusal,
        on the caller's thread. It must not block."""

        def callback(result: Any, reason: int) -> None:
            if reason == FAIL_REASON.SUCCESS:
                self._call(on_done, result, None)
            else:
                self._call(on_done, None, error_for_fail_reason(reason, self.leader_hint()))

        if not self._group._isLeader():
            callback(None, FAIL_REASON.NOT_LEADER)
            return
        self._group.apply_entry(payload, callback=callback)

    def read_index(self, on_done: OnDone) -> None:
        """A linearizable read without a log entry (``readindex.py``):
        ``on_done({"i": read_index}, None)`` once this replica, leading, has
        confirmed its leadership with a majority after this call and applied
        its log up to the read index, so a read of its state now reflects
        every write acknowledged before this call; else ``on_done(None,
        error)`` (NOT_LEADER when it does not lead, or stops leading first).
        ``on_done`` runs on the Raft thread and must not block."""
        self.hub.call_soon(lambda: self._read_request(on_done))

    def _read_request(self, on_done: OnDone) -> None:
        group = self._group
        failed = self.transport.reads.leading(
            int(group.raftCurrentTerm) if group._isLeader() else None)
        self._fail_reads(failed)
        if self.transport.reads.term is None:
            self._fail_reads([on_done])
            return
        term, commit = self.transport.reads.term, int(group.raftCommitIndex)
        self.transport.reads.request(term, commit, self._commit_in_term(term, commit), on_done)
        if not self._read_round_queued:
            # Reads queued on the hub until this call runs share one round.
            self._read_round_queued = True
            self.hub.call_soon(self._start_read_round)

    def _start_read_round(self) -> None:
        self._read_round_queued = False
        if self.transport.reads.start_round() is None:
            return
        if self.transport.has_peers:
            self.transport.open_round()  # their read_acks confirm it
        else:
            self._serve_reads()

    def _serve_reads(self) -> None:
        """Complete the reads that may be served; fail them all if this
        replica no longer leads the term they were taken in."""
        reads, group = self.transport.reads, self._group
        term = int(group.raftCurrentTerm) if group._isLeader() else None
        self._fail_reads(reads.leading(term))
        if term is None or not reads.pending:
            return
        commit = int(group.raftCommitIndex)
        if reads.unindexed:
            reads.commit_advanced(term, commit, self._commit_in_term(term, commit))
        voters = len(self.transport.peer_addresses()) + 1
        for on_read, index in reads.ready(voters, int(group.raftLastApplied)):
            self._call(on_read, {"i": index}, None)

    def _fail_reads(self, failed: list[Any]) -> None:
        if failed:
            error = error_for_fail_reason(FAIL_REASON.NOT_LEADER, self.leader_hint())
            for on_read in failed:
                self._call(on_read, None, error)

    def _commit_in_term(self, term: int, commit: int) -> bool:
        """The entry at the commit index is of ``term``. Once one is, every later
        commit index of the term is too (a leader appends only its own term's
        entries), so the log is looked up only until then."""
        if self._committed_in_term != term:
            entries = self._group._SyncObj__getEntries(commit, 1)
            if not entries or int(entries[0][2]) != term:
                return False
            self._committed_in_term = term
        return True

    def _call(self, on_done: OnDone, result: Any, error: RaftKVError | None) -> None:
        try:
            on_done(result, error)
        except BaseException:
            log.exception("shard %d: result callback failed", self.shard_id)

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

        self.hub.call_soon(lambda: self._group.transferLeadership(address, callback=callback))

    def destroy(self) -> None:
        """Take the group off the hub (no tick or apply runs after this) and close files."""
        def detach() -> None:
            for on_read in self.transport.reads.fail_all():
                self._call(on_read, None, Unavailable(f"shard {self.shard_id}: the replica "
                                                      "was closed"))
            self._group.destroy()  # without autoTick: closes the transport and journal now

        try:
            self.hub.remove(self.transport, then=detach)
        except (RuntimeError, TimeoutError):
            log.warning("shard %d: the Raft hub is gone; closing the group here", self.shard_id)
            detach()
        if self._own_hub:
            self.hub.close()
        self._close_log()
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
