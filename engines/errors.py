"""Errors the engine layer raises for bad input, with messages meant for users."""


class EngineError(Exception):
    """Base class: a problem a user can fix (bad store, bad request, bad config)."""


class StoreError(EngineError):
    """The engine store is missing, corrupt, or was built for another model."""


class RequestError(EngineError):
    """A request cannot be served as given (empty prompt, too long, bad parameters)."""
