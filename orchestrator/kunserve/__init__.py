"""KunServe's online control: detect KV overload, plan drops, decide restores.

The modules here are pure (no MPI, no torch, no I/O): they turn load reports into
decisions, and the cluster carries those decisions out.

- ``load_monitor``: a sliding window of load samples per instance; overload votes,
  trends and the restore condition (DESIGN.md section 2, steps 1 and 7).
- ``planner``: the greedy drop planner, which replicas to fuse into which pipeline
  groups (step 2).
"""
