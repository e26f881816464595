"""Name -> factory registries shared by models, datasets, defenses and attacks.

A registry is filled by a decorator at import time of the module that defines
the component (no work is done then, only a dict entry).  ``create`` rejects an
unknown name with an error that lists the valid names, so that a typo on the
command line reads as one clear line.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List


class UnknownNameError(ValueError):
    """Raised for a name that no registry entry has; the message lists the valid ones."""


class Registry:
    """A mapping from a component name to its factory.

    >>> MODELS = Registry("model")
    >>> @MODELS.register("mlp3")
    ... def mlp3(**kwargs): ...
    >>> MODELS.create("mlp3", num_classes=10)
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: Dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = factory
            return factory

        return decorator

    def names(self) -> List[str]:
        return sorted(self._factories)

    def check(self, name: str) -> str:
        """Return ``name`` if registered, else raise UnknownNameError naming the valid choices."""
        if name not in self._factories:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; valid choices: {', '.join(self.names())}"
            )
        return name

    def get(self, name: str) -> Callable[..., Any]:
        return self._factories[self.check(name)]

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name)(*args, **kwargs)

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
