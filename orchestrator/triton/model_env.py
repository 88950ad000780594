"""The environment the launcher (``triton/server.py``) sets for the Triton model
(``triton_repo/*/model.py``); the stub inherits it. Both sides import the names from
here, so the model needs nothing from the launcher."""

INGRESS_URL_ENV = "KUNSERVE_INGRESS_URL"
"""How the launcher tells ``model.py`` where the ingress is (the stub inherits the environment)."""

RELAY_SOCKET_ENV = "KUNSERVE_RELAY_SOCKET"
"""Where ``model.py`` sends requests: the ingress's relay socket (``orchestrator/ingress/relay.py``)."""

METRICS_MODEL_ENV = "KUNSERVE_METRICS_MODEL"
"""The one served name whose stub mirrors the cluster's metrics (mirroring twice would clash)."""
