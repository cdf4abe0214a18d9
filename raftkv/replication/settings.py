"""The Raft settings of a group (pysyncobj's knobs, with units in the names):
a module of its own, so that the configuration and the CLI read them without
importing pysyncobj and LevelDB."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RaftSettings:
    """Every pysyncobj knob the project sets, with units in the names."""

    election_timeout_s_min: float = 0.8
    election_timeout_s_max: float = 1.6
    # A founding replica (Replica(founding=True)) that starts empty waits this
    # long for its group's first election instead.
    first_election_timeout_s_min: float = 0.15
    first_election_timeout_s_max: float = 0.35
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
