"""The supervisor: a front door that outlives the MPI job.

``main.py`` is ``python -m orchestrator supervise``; ``supervisor.py`` its state machine
(start the job, watch it, restart it); ``remote_backend.py`` the ingress's backend that
holds requests while no job serves and moves them to the next job; ``job.py`` the
``mpirun`` child; ``config.py`` its options. The job's side of the channel is
``orchestrator/ingress/supervisor_link.py``, its format ``orchestrator/ingress/backend_wire.py``.
"""
