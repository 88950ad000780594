"""A discrete-event simulator of the serving cluster (issue: the cluster-scale simulator).

The one place in the project where time is modelled: a simulated clock (``clock``), links
whose transfers share bandwidth (``links``), and step costs (the fitted ``CostModel`` of
``perf.profile_cost`` on this host). Nothing here sleeps; simulated seconds pass only as
events are taken off the clock's queue.
"""
