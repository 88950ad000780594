"""The MPI serving cluster: one rank per device, replicas and pipelined groups.

Every rank runs ``rank_loop.RankLoop``. Rank 0 also runs the controller (dispatcher,
request table) and the HTTP ingress. An instance's first rank leads it: it schedules
for the instance and drives its micro-batches through the other ranks' stages.
"""
