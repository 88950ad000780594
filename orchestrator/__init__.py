"""The orchestrator: request scheduling, the engine loop, and (later) the MPI cluster.

``python -m orchestrator generate`` runs offline generation on the pp1 engine of a store.
"""
