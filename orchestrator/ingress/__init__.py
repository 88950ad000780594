"""The HTTP ingress: an OpenAI-compatible aiohttp server in front of the cluster.

``backend.py`` is the contract with the cluster, ``openai_protocol.py`` turns request
bodies into ``GenerateRequest``s and results into OpenAI responses, ``metrics.py`` keeps
the Prometheus statistics, and ``server.py`` holds the routes and the server thread.
"""
