"""Errors that cross layers, each with the answer a front end gives it.

A bad option or request is a ``ValueError`` where it is found (400 on the API, exit
status 2 at start-up); these are the others.
"""

from __future__ import annotations


class QueueFullError(Exception):
    """The cluster's bounded queue is full (the ingress answers 429)."""


class BackendUnavailable(Exception):
    """The cluster is not ready or is shutting down (the ingress answers 503, with
    ``Retry-After`` when ``retry_after_s`` says when to try again)."""

    def __init__(self, message: str = "", retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Refused(Exception):
    """An operation that cannot be done now, in this state: a drop of ranks already in a
    group, a restore with nothing dropped, a regroup with requests in flight (409)."""


class ReshapeTimeout(Exception):
    """A drop, restore or regroup did not finish in time (504); it may still finish."""
