"""Replica and leader placement for physical shards: one pure function.

``plan_placement(nodes, shards, concurrent_moves_per_node_max=...,
moves_in_progress=...)`` looks at the cluster as it is and returns a
``PlacementPlan``: for every physical shard the replica set it should converge
to and its preferred leader, plus the membership changes to start now. It does
no I/O and draws no random numbers; every choice has a tie-break on ids, so the
same input (in any order) gives the same plan. The shard manager calls it
again after moves finish, until the plan has no moves left.

Rules (never broken by a target replica set)
--------------------------------------------
For a shard with replication factor RF, with ``L`` live nodes in ``D`` data
centers that have at least one live node:

- **size**: ``wanted = min(RF, L)`` replicas, on distinct live nodes. A shard
  with ``wanted < RF`` is reported ``under_replicated``.
- **spread**: the replicas use ``min(wanted, D)`` distinct DCs, and no DC holds
  more than ``per_dc_max`` of them: the smallest ``k >= 1`` with
  ``sum over live DCs of min(live nodes in the DC, k) >= wanted``. When
  ``D >= RF`` that is one replica per DC. When ``D < RF`` (say RF 3 over 2 DCs)
  distinct DCs are impossible; the replicas are still on distinct nodes, split
  as evenly over the DCs as the live nodes allow (2 + 1).

Dead nodes, and node ids the input does not list, are never targets.

Balance (what the plan optimises within the rules)
--------------------------------------------------
``count(n)`` is the number of target replicas on live node ``n`` and
``cap(n)`` its capacity (a positive integer weight). The plan minimises
``sum(count(n)**2 / cap(n))``, the capacity-weighted squared distance from a
perfectly proportional layout. Relocating one replica from ``a`` to ``b``
changes that sum by ``(2*count(b) + 1)/cap(b) - (2*count(a) - 1)/cap(a)``, so
the relocation is **improving** exactly when::

    (2*count(a) - 1) * cap(b) > (2*count(b) + 1) * cap(a)
    i.e.  count(a)/cap(a) - count(b)/cap(b) > (1/cap(a) + 1/cap(b)) / 2

**Definition.** Replicas are *balanced* when no single replica can be
relocated from its node to another live node, keeping the shard within the
rules above, by an improving relocation. What this gives:

- equal capacities: ``count(a) - count(b) <= 1`` for every pair between which
  some replica could legally move. With one DC (or whenever no spread rule
  stands in the way) that is every pair: ``max - min <= 1`` over live nodes,
  i.e. every node holds the floor or the ceiling of the fair share.
- weighted: for such pairs ``count/cap`` differ by at most the mean of their
  steps ``1/cap``; all relocatable nodes hold ``round(M * cap(n))`` replicas
  for one common scale ``M`` (Sainte-Lague rounding). This is within 1 of the
  exact share ``total * cap(n) / total_cap`` except for rare skewed cases (one
  capacity-4 node among eleven capacity-1 nodes with 3 replicas in all holds 2,
  where the exact share is 0.8).
- the spread rule can force imbalance no placement avoids (3 DCs, RF 3, one
  DC with a single node: that node holds every shard); the definition only
  asks for what the rules allow.

**Leaders** are balanced the same way, with ``leaders(n)`` for ``count(n)``,
but a leader can only move to another replica of the same shard, so the plan
moves leadership along chains (shard s1 from a to b, shard s2 from b to c:
only a and c change counts). *Leaders are balanced* when no chain of
transfers from a to c is improving by the formula above. That is the best
possible leader balance for the target replica sets (a convex-cost flow has no
improving path only at its optimum); e.g. 8 shards of RF 3 over 3 DCs x 2
nodes get 1 or 2 leaders per node.

Algorithm
---------
1. **Keep.** Every shard keeps its current replicas on live nodes. Where a
   shard breaks a rule (too many replicas, too many in one DC, too few DCs),
   replicas are dropped from its most crowded DC, the most loaded node first,
   the current leader last.
2. **Fill.** Shards with fewer than ``wanted`` replicas (new shards, replicas
   on dead nodes) get them on the least loaded eligible node (lowest
   ``(2*count+1)/cap``), unused DCs first while the shard needs more DCs.
3. **Rebalance.** While an improving relocation exists, make one: from the
   most loaded node (highest ``(2*count-1)/cap``) to the least loaded node
   (lowest ``(2*count+1)/cap``) that can legally take one of its replicas.
   Relocating a replica that was only planned (not yet created) is preferred
   over moving an existing one, and a shard's leader replica moves last.
   Then undo what turned out needless: a current replica replaced by a new
   one goes back if that is legal and no worse for balance, and two
   replacements that swap nodes (s from a to b, t from b to a) both go back.
   Repeat until neither changes anything. Each relocation strictly lowers
   the objective and each undo keeps or lowers it while moving fewer
   replicas, so this stops.
4. **Leaders.** The current leader stays when it is in the target set; other
   shards take the target replica with the fewest leaders. Then, while an
   improving chain exists (found by breadth-first search from the node with
   the most leaders per capacity), leadership moves along it.
5. **Moves.** Per shard, target minus current gives the replicas to add and
   to remove; each add is paired with a removal into one ``Move`` (the caller
   adds the new replica, lets it catch up, then removes the old one; DESIGN
   section 5). Moves are taken in priority order (repairs of shards with the
   fewest live replicas, removals, spread fixes, balance) while throttle budget
   remains; the rest are ``deferred`` to a later call.

Minimal movement: a live current replica that follows the rules is kept
unless balance needs it moved. Precisely: a balanced layout that follows the
rules gets no moves (so planning again after applying a plan's targets gives
the same targets and no moves); and for every live replica a plan drops (on
node a) and every new replica of the same shard (on node b), keeping a
instead of b would break a rule or leave the layout strictly less balanced,
and no two replacements swap nodes. Longer cycles of replacements (a to b, b
to c, c to a) are not searched for.

Throttle
--------
Each live node ``n`` may take part in ``concurrent_moves_per_node_max -
moves_in_progress[n]`` new moves (at least 0) as the node that receives the
new replica or the node that loses one. Dead nodes lose replicas without
doing any work and are not throttled. pysyncobj changes membership one server
at a time, so a plan has at most one move per shard, except for a shard with
no live replica at all, whose replicas are created together (there is no
running group to change). Moves that do not fit are ``deferred``; a deferred
move is always one that would have exceeded a budget or given a shard a
second move.

Costs: the rebalance makes O(relocations) passes of O(nodes**2 + replicas)
work: about 0.2 s for 1000 shards of RF 3 on 60 nodes, not tuned for
hundreds of thousands of shards.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import NewType

NodeId = NewType("NodeId", str)
DataCenterId = NewType("DataCenterId", str)
PhysicalShardId = NewType("PhysicalShardId", int)


class PlacementInputError(ValueError):
    """The input of ``plan_placement`` is malformed.

    Raised for duplicate node or shard ids, a node listed twice in one
    shard's replicas, a capacity or replication factor below 1, a move limit
    below 1 or a negative count of moves in progress; the message says which.
    An unhealthy cluster (dead nodes, too few nodes or DCs, replica sets
    naming unknown nodes) is not malformed: the plan handles it.
    """


@dataclass(frozen=True)
class Node:
    """A node as placement sees it."""

    id: NodeId
    dc: DataCenterId
    capacity: int = 1
    """Positive integer weight: a node of capacity 2 should hold twice the
    replicas (and leaders) of a node of capacity 1."""
    alive: bool = True
    """False once the shard manager has given up on the node: its replicas
    are replaced elsewhere."""


@dataclass(frozen=True)
class Shard:
    """A physical shard (Raft group) as it is now."""

    id: PhysicalShardId
    replication_factor: int
    replicas: tuple[NodeId, ...] = ()
    """Current members, any order, each once; may be empty (a new shard) and
    may name dead or unknown nodes."""
    leader: NodeId | None = None
    """Current leader if known; ignored unless it is a live member."""


@dataclass(frozen=True)
class ShardTarget:
    """Where a shard should end up."""

    shard: PhysicalShardId
    replicas: tuple[NodeId, ...]
    """Target members, sorted: ``min(RF, live nodes)`` distinct live nodes."""
    leader: NodeId | None
    """Preferred leader, one of ``replicas`` (possibly one still to be added:
    transfer leadership once it has caught up); None only if no node is
    alive."""
    under_replicated: bool
    """Fewer live nodes than the replication factor: ``replicas`` is short."""


class MoveReason(enum.Enum):
    """Why a move is in the plan, in the order moves get throttle budget."""

    REPAIR = "repair"
    """Adds a missing replica, or replaces one on a dead or unknown node."""
    SHRINK = "shrink"
    """Removes a replica with nothing added: beyond RF, or on a dead node."""
    SPREAD = "spread"
    """Replaces a live replica that breaks the DC spread rule."""
    BALANCE = "balance"
    """Replaces a live replica to even out replica counts."""


@dataclass(frozen=True)
class Move:
    """One membership change of one shard: add first, then remove.

    The caller adds ``add`` (if any), waits until it has caught up, moves
    leadership away from ``remove`` if it leads, then removes ``remove`` (if
    any). Until the move is over, the caller should keep reporting the shard
    with its replicas from before the move and count the move in
    ``moves_in_progress`` for both nodes: a half-done move (both nodes are
    members) looks like a replica beyond RF, and a plan would remove one.
    """

    shard: PhysicalShardId
    add: NodeId | None
    remove: NodeId | None
    reason: MoveReason


@dataclass(frozen=True)
class PlacementPlan:
    """What ``plan_placement`` returns."""

    targets: tuple[ShardTarget, ...]
    """One per input shard, sorted by shard id."""
    moves: tuple[Move, ...]
    """To start now, in priority order; within every node's budget."""
    deferred: tuple[Move, ...]
    """Needed as well but over budget this time; a later call plans them."""

    @property
    def converged(self) -> bool:
        """No move is left: every replica set equals its target (or, with no
        live node at all, nothing can be done)."""
        return not self.moves and not self.deferred

    def target(self, shard: PhysicalShardId) -> ShardTarget:
        """The target of one shard; KeyError if the input did not have it."""
        for target in self.targets:
            if target.shard == shard:
                return target
        raise KeyError(shard)


_REASON_RANK = {
    MoveReason.REPAIR: 0,
    MoveReason.SHRINK: 1,
    MoveReason.SPREAD: 2,
    MoveReason.BALANCE: 3,
}


def plan_placement(
    nodes: Iterable[Node],
    shards: Iterable[Shard],
    *,
    concurrent_moves_per_node_max: int,
    moves_in_progress: Mapping[NodeId, int] | None = None,
) -> PlacementPlan:
    """Plan target replica sets, preferred leaders and throttled moves.

    ``moves_in_progress[n]`` counts moves already running that involve node
    ``n``; they use up its budget. See the module docstring for the rules,
    the balance definition and the algorithm.
    """
    in_progress = dict(moves_in_progress or {})
    cluster = _Cluster.build(nodes, concurrent_moves_per_node_max, in_progress)
    shard_list = _sorted_shards(shards)
    work = _Layout(cluster, shard_list)
    work.keep()
    work.fill()
    work.rebalance()
    leaders = _place_leaders(cluster, work, shard_list)
    moves = [m for shard in shard_list for m in _shard_moves(cluster, work, shard)]
    budget = {
        n: max(0, concurrent_moves_per_node_max - in_progress.get(n, 0)) for n in cluster.live
    }
    started, deferred = _throttle(cluster, work, moves, budget)
    targets = tuple(
        ShardTarget(
            shard=shard.id,
            replicas=tuple(sorted(work.target[shard.id])),
            leader=leaders[shard.id],
            under_replicated=len(work.target[shard.id]) < shard.replication_factor,
        )
        for shard in shard_list
    )
    return PlacementPlan(targets=targets, moves=tuple(started), deferred=tuple(deferred))


# ---------------------------------------------------------------------------
# input


@dataclass(frozen=True)
class _SpreadRule:
    """The size and spread rules for one replication factor."""

    wanted: int
    dcs_wanted: int
    per_dc_max: int

    def fits(self, members: Iterable[NodeId], dc_of: Mapping[NodeId, DataCenterId]) -> bool:
        """True if ``members`` is within the rules or can still grow into them."""
        per_dc = Counter(dc_of[n] for n in members)
        size = sum(per_dc.values())
        missing_dcs = max(0, self.dcs_wanted - len(per_dc))
        return (
            size <= self.wanted
            and max(per_dc.values(), default=0) <= self.per_dc_max
            and size + missing_dcs <= self.wanted
        )


@dataclass(frozen=True)
class _Cluster:
    live: tuple[NodeId, ...]
    """Live node ids, sorted."""
    capacity: Mapping[NodeId, int]
    dc_of: Mapping[NodeId, DataCenterId]
    live_per_dc: Mapping[DataCenterId, int]

    @staticmethod
    def build(nodes: Iterable[Node], moves_max: int, in_progress: Mapping[NodeId, int]) -> _Cluster:
        if moves_max < 1:
            raise PlacementInputError(
                f"concurrent_moves_per_node_max must be >= 1, got {moves_max}"
            )
        for node_id, count in in_progress.items():
            if count < 0:
                raise PlacementInputError(f"moves_in_progress[{node_id!r}] is negative: {count}")
        by_id: dict[NodeId, Node] = {}
        for node in nodes:
            if node.id in by_id:
                raise PlacementInputError(f"duplicate node id {node.id!r}")
            if node.capacity < 1:
                raise PlacementInputError(
                    f"node {node.id!r}: capacity must be >= 1, got {node.capacity}"
                )
            by_id[node.id] = node
        live = tuple(sorted(n for n, node in by_id.items() if node.alive))
        return _Cluster(
            live=live,
            capacity={n: by_id[n].capacity for n in live},
            dc_of={n: by_id[n].dc for n in live},
            live_per_dc=Counter(by_id[n].dc for n in live),
        )

    def is_live(self, node: NodeId) -> bool:
        return node in self.capacity

    def rule(self, replication_factor: int) -> _SpreadRule:
        wanted = min(replication_factor, len(self.live))
        per_dc_max = 0
        while sum(min(c, per_dc_max) for c in self.live_per_dc.values()) < wanted:
            per_dc_max += 1
        return _SpreadRule(
            wanted=wanted, dcs_wanted=min(wanted, len(self.live_per_dc)), per_dc_max=per_dc_max
        )

    def cost_to_add(self, count: int, node: NodeId) -> Fraction:
        """Increase of sum(count**2/cap) when ``node`` (holding ``count``) gains one."""
        return Fraction(2 * count + 1, self.capacity[node])

    def gain_to_remove(self, count: int, node: NodeId) -> Fraction:
        """Decrease of sum(count**2/cap) when ``node`` (holding ``count``) loses one."""
        return Fraction(2 * count - 1, self.capacity[node])


def _sorted_shards(shards: Iterable[Shard]) -> list[Shard]:
    by_id: dict[PhysicalShardId, Shard] = {}
    for shard in shards:
        if shard.id in by_id:
            raise PlacementInputError(f"duplicate shard id {shard.id}")
        if len(set(shard.replicas)) != len(shard.replicas):
            raise PlacementInputError(f"shard {shard.id}: a node is listed twice: {shard.replicas}")
        if shard.replication_factor < 1:
            raise PlacementInputError(
                f"shard {shard.id}: replication factor must be >= 1, got {shard.replication_factor}"
            )
        by_id[shard.id] = shard
    return [by_id[s] for s in sorted(by_id)]


# ---------------------------------------------------------------------------
# steps 1-3: target replica sets


class _Layout:
    """The target replica sets being built, with per-node replica counts."""

    def __init__(self, cluster: _Cluster, shards: list[Shard]) -> None:
        self.cluster = cluster
        self.shards = shards
        self.rules = {s.id: cluster.rule(s.replication_factor) for s in shards}
        self.current_live = {
            s.id: frozenset(n for n in s.replicas if cluster.is_live(n)) for s in shards
        }
        self.current_leader = {
            s.id: s.leader if s.leader in self.current_live[s.id] else None for s in shards
        }
        self.target: dict[PhysicalShardId, set[NodeId]] = {}
        self.hosted: dict[NodeId, set[PhysicalShardId]] = {n: set() for n in cluster.live}
        self.dropped_for_spread: set[tuple[PhysicalShardId, NodeId]] = set()

    def count(self, node: NodeId) -> int:
        return len(self.hosted[node])

    def _add(self, shard: PhysicalShardId, node: NodeId) -> None:
        self.target[shard].add(node)
        self.hosted[node].add(shard)

    def _remove(self, shard: PhysicalShardId, node: NodeId) -> None:
        self.target[shard].remove(node)
        self.hosted[node].remove(shard)

    def keep(self) -> None:
        """Step 1: keep live current replicas, dropping what breaks a rule."""
        for shard in self.shards:
            self.target[shard.id] = set()
            for node in self.current_live[shard.id]:
                self._add(shard.id, node)
        dc_of = self.cluster.dc_of
        for shard in self.shards:
            rule = self.rules[shard.id]
            members = self.target[shard.id]
            while not rule.fits(members, dc_of):
                per_dc = Counter(dc_of[n] for n in members)
                crowded = max(per_dc.values())
                victim = max(
                    (n for n in members if per_dc[dc_of[n]] == crowded),
                    key=lambda n: (
                        n != self.current_leader[shard.id],
                        self.cluster.gain_to_remove(self.count(n), n),
                        n,
                    ),
                )
                if len(members) <= rule.wanted:
                    self.dropped_for_spread.add((shard.id, victim))
                self._remove(shard.id, victim)

    def fill(self) -> None:
        """Step 2: add replicas to shards below ``wanted``."""
        dc_of = self.cluster.dc_of
        for shard in self.shards:
            rule = self.rules[shard.id]
            members = self.target[shard.id]
            while len(members) < rule.wanted:
                per_dc = Counter(dc_of[n] for n in members)
                need_new_dc = len(per_dc) < rule.dcs_wanted
                eligible = [
                    n
                    for n in self.cluster.live
                    if n not in members
                    and per_dc[dc_of[n]] < rule.per_dc_max
                    and not (need_new_dc and per_dc[dc_of[n]] > 0)
                ]
                assert eligible, f"shard {shard.id}: no eligible node (rule {rule})"
                best = min(eligible, key=lambda n: (self.cluster.cost_to_add(self.count(n), n), n))
                self._add(shard.id, best)
                assert rule.fits(members, dc_of)

    def rebalance(self) -> None:
        """Step 3: improving relocations, then undo the ones that were not needed.

        Every relocation lowers the objective; every undo keeps it or lowers
        it and moves one replica fewer, so the loop ends.
        """
        self._relocate_while_improving()
        while self._undo_needless_relocations():
            self._relocate_while_improving()

    def _relocate_while_improving(self) -> None:
        while (relocation := self._find_relocation()) is not None:
            self._relocate(*relocation)

    def _relocate(self, shard: PhysicalShardId, source: NodeId, dest: NodeId) -> None:
        self._remove(shard, source)
        self._add(shard, dest)
        assert self.rules[shard].fits(self.target[shard], self.cluster.dc_of)

    def _undo_needless_relocations(self) -> bool:
        """Put back current replicas whose replacement does not improve balance.

        A greedy relocation that looked necessary early can be balance-neutral
        once later ones are made: moving it back leaves the layout as good.
        Two relocations that swap nodes (shard s from a to b, shard t from b
        to a) change no count at all. Returns True if anything was put back.
        """
        cluster = self.cluster
        for shard, old, new in self._relocations():
            keeps_balance = cluster.gain_to_remove(self.count(new), new) >= cluster.cost_to_add(
                self.count(old), old
            )
            if keeps_balance and self.can_relocate(shard, new, old):
                self._relocate(shard, new, old)
                return True
        relocations = self._relocations()
        for shard, old, new in relocations:
            for other, other_old, other_new in relocations:
                if (
                    other != shard
                    and (other_old, other_new) == (new, old)
                    and self.can_relocate(shard, new, old)
                    and self.can_relocate(other, old, new)
                ):
                    self._relocate(shard, new, old)
                    self._relocate(other, old, new)
                    return True
        return False

    def _relocations(self) -> list[tuple[PhysicalShardId, NodeId, NodeId]]:
        """(shard, old, new): a live current replica dropped, and a new one."""
        return [
            (shard.id, old, new)
            for shard in self.shards
            for old in sorted(self.current_live[shard.id] - self.target[shard.id])
            for new in sorted(self.target[shard.id] - self.current_live[shard.id])
        ]

    def _find_relocation(self) -> tuple[PhysicalShardId, NodeId, NodeId] | None:
        cluster = self.cluster
        sources = sorted(
            (n for n in cluster.live if self.count(n) > 0),
            key=lambda n: (-cluster.gain_to_remove(self.count(n), n), n),
        )
        dests = sorted(cluster.live, key=lambda n: (cluster.cost_to_add(self.count(n), n), n))
        for source in sources:
            gain = cluster.gain_to_remove(self.count(source), source)
            for dest in dests:
                if cluster.cost_to_add(self.count(dest), dest) >= gain:
                    break  # dests are sorted: no later one improves either
                movable = [s for s in self.hosted[source] if self.can_relocate(s, source, dest)]
                if movable:
                    return (
                        min(movable, key=lambda s: self._move_cost(s, source, dest)),
                        source,
                        dest,
                    )
        return None

    def can_relocate(self, shard: PhysicalShardId, source: NodeId, dest: NodeId) -> bool:
        members = self.target[shard]
        if dest in members:
            return False
        return self.rules[shard].fits((members - {source}) | {dest}, self.cluster.dc_of)

    def _move_cost(
        self, shard: PhysicalShardId, source: NodeId, dest: NodeId
    ) -> tuple[int, int, int, PhysicalShardId]:
        """Sort key among relocations source -> dest: cheapest first."""
        current = self.current_live[shard]
        return (
            0 if dest in current else 1,  # undoes a planned removal
            1 if source in current else 0,  # moves a real replica, not a planned one
            1 if self.current_leader[shard] == source else 0,  # needs a leader transfer
            shard,
        )


# ---------------------------------------------------------------------------
# step 4: leaders


def _place_leaders(
    cluster: _Cluster, work: _Layout, shards: list[Shard]
) -> dict[PhysicalShardId, NodeId | None]:
    leader: dict[PhysicalShardId, NodeId | None] = {}
    led: dict[NodeId, set[PhysicalShardId]] = {n: set() for n in cluster.live}
    for shard in shards:
        kept = work.current_leader[shard.id]
        if kept is not None and kept in work.target[shard.id]:
            leader[shard.id] = kept
            led[kept].add(shard.id)
    for shard in shards:
        members = work.target[shard.id]
        if shard.id in leader:
            continue
        if not members:
            leader[shard.id] = None
            continue
        current = work.current_live[shard.id]
        best = min(
            members,
            key=lambda n: (cluster.cost_to_add(len(led[n]), n), n not in current, n),
        )
        leader[shard.id] = best
        led[best].add(shard.id)

    while (chain := _find_leader_chain(cluster, work, led)) is not None:
        for shard_id, old, new in chain:
            assert leader[shard_id] == old
            leader[shard_id] = new
            led[old].remove(shard_id)
            led[new].add(shard_id)
    return leader


def _find_leader_chain(
    cluster: _Cluster, work: _Layout, led: Mapping[NodeId, set[PhysicalShardId]]
) -> list[tuple[PhysicalShardId, NodeId, NodeId]] | None:
    """An improving chain of leader transfers, as (shard, from, to) steps."""
    sources = sorted(
        (n for n in cluster.live if led[n]),
        key=lambda n: (-cluster.gain_to_remove(len(led[n]), n), n),
    )
    for source in sources:
        parent = _leader_reach(work, led, source)
        if not parent:
            continue
        dest = min(parent, key=lambda n: (cluster.cost_to_add(len(led[n]), n), n))
        if cluster.cost_to_add(len(led[dest]), dest) >= cluster.gain_to_remove(
            len(led[source]), source
        ):
            continue
        chain: list[tuple[PhysicalShardId, NodeId, NodeId]] = []
        node = dest
        while node != source:
            shard, previous = parent[node]
            chain.append((shard, previous, node))
            node = previous
        chain.reverse()
        return chain
    return None


def _leader_reach(
    work: _Layout, led: Mapping[NodeId, set[PhysicalShardId]], source: NodeId
) -> dict[NodeId, tuple[PhysicalShardId, NodeId]]:
    """Breadth-first search over "x leads a shard that y also replicates".

    Returns, for every node reachable from ``source`` (``source`` excluded),
    the (shard, previous node) step that reached it on a shortest chain.
    """
    parent: dict[NodeId, tuple[PhysicalShardId, NodeId]] = {}
    frontier = [source]
    seen = {source}
    while frontier:
        following: list[NodeId] = []
        for node in frontier:
            for shard in sorted(led[node]):
                for other in sorted(work.target[shard]):
                    if other not in seen:
                        seen.add(other)
                        parent[other] = (shard, node)
                        following.append(other)
        frontier = following
    return parent


# ---------------------------------------------------------------------------
# step 5: moves and the throttle


def _shard_moves(cluster: _Cluster, work: _Layout, shard: Shard) -> list[Move]:
    target = work.target[shard.id]
    if not target:
        return []  # no live node at all: nothing can be done
    current = set(shard.replicas)
    adds = sorted(target - current)
    removes = current - target
    dead = sorted(n for n in removes if not cluster.is_live(n))
    spread = sorted(n for n in removes if (shard.id, n) in work.dropped_for_spread)
    other = sorted(removes - set(dead) - set(spread))
    # Pair adds with removals: dead replicas first, then rule breakers.
    removal_order = [
        *((n, MoveReason.REPAIR) for n in dead),
        *((n, MoveReason.SPREAD) for n in spread),
        *((n, MoveReason.BALANCE) for n in other),
    ]
    moves: list[Move] = []
    for add, (remove, reason) in zip(adds, removal_order, strict=False):
        moves.append(Move(shard.id, add, remove, reason))
    moves.extend(Move(shard.id, add, None, MoveReason.REPAIR) for add in adds[len(removal_order) :])
    moves.extend(
        Move(shard.id, None, remove, MoveReason.SHRINK) for remove, _ in removal_order[len(adds) :]
    )
    return moves


def _throttle(
    cluster: _Cluster, work: _Layout, moves: list[Move], budget: dict[NodeId, int]
) -> tuple[list[Move], list[Move]]:
    """Split moves into (start now, deferred) within every live node's budget."""
    live_count = {shard: len(live) for shard, live in work.current_live.items()}

    def priority(move: Move) -> tuple[int, int, PhysicalShardId, str, str]:
        return (
            _REASON_RANK[move.reason],
            live_count[move.shard],
            move.shard,
            move.add or "",
            move.remove or "",
        )

    started: list[Move] = []
    deferred: list[Move] = []
    moving: set[PhysicalShardId] = set()
    for move in sorted(moves, key=priority):
        involved = [n for n in (move.add, move.remove) if n is not None and cluster.is_live(n)]
        one_at_a_time = live_count[move.shard] > 0
        if (one_at_a_time and move.shard in moving) or any(budget[n] == 0 for n in involved):
            deferred.append(move)
            continue
        for n in involved:
            budget[n] -= 1
        moving.add(move.shard)
        started.append(move)
    return started, deferred
