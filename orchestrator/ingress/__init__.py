"""The HTTP ingress: an OpenAI-compatible aiohttp server in front of the cluster.

``backend.py`` is the contract with the cluster, ``openai_protocol.py`` turns request
bodies into ``GenerateRequest``s and results into OpenAI responses, ``answer.py`` turns a
request's token events into text (stop strings, statistics, aborts), ``metrics.py`` keeps
the Prometheus statistics, ``server.py`` holds the routes and the server thread, and
``relay.py`` (wire format in ``relay_wire.py``) takes the Triton model's requests over a
Unix socket, and ``request_log.py`` writes a line per request (``serve --request-log``).
"""
