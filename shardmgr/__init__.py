"""The shard manager: where physical shards live and who leads them.

The shard manager owns the cluster's topology (nodes and their data centers),
the physical shards (Raft groups) and their replica sets, and the shard map
that clients cache. Its decisions are pure functions over plain values, kept
apart from the Raft group and the network code that carry them out:

- ``shardmgr.placement``: given nodes, shards and the move throttle, the target
  replica set and preferred leader of every shard, and the membership changes
  to make now.
"""
