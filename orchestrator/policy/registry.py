"""One registry pattern for every kind of policy: classes registered by name beside the
policies they name, made by name with a clear error for an unknown one."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Policy classes of one kind (``what``: "dispatch policy", ...) by their ``name``."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator; the class's ``name`` attribute is its registered name."""
        name = getattr(cls, "name")
        if name in self._classes:
            raise ValueError(f"two {self.what} classes are named {name!r}")
        self._classes[name] = cls
        return cls

    def names(self) -> list[str]:
        return sorted(self._classes)

    def get(self, name: str) -> type[T]:
        try:
            return self._classes[name]
        except KeyError:
            raise ValueError(f"unknown {self.what} {name!r}; known: {', '.join(self.names())}") from None

    def make(self, name: str, *args, **kwargs) -> T:
        return self.get(name)(*args, **kwargs)

    def described(self, describe: Callable[[type[T]], str]) -> str:
        """``name: description; ...`` for a ``--help`` text."""
        return "; ".join(f"{n}: {describe(self._classes[n])}" for n in self.names())
