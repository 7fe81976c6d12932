"""Adapters declared once: a registry of the frame sources or line outputs a station file can name.

Each adapter module declares its config dataclass (with a `type: Literal["key"]` field) and registers its class
with it, `@OUTPUTS.register(GpioConfig)` above `class GpioOutput`. The station-file schema takes its tagged union
(`registry.annotation`) and the daemon its builder (`registry.build`) from the registry, so a new output or source
is one new module and one import line in its package. Test doubles register themselves from the test suite and
so never appear in a station file's schema.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Annotated, Any, Callable, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")


class Registry:
    """The adapters of one kind ("output", "source"), keyed by config dataclass and by `type` key."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._classes: dict[type, type] = {}
        self._keys: dict[str, type] = {}

    def register(self, config_cls: type) -> Callable[[type[T]], type[T]]:
        """Class decorator: `cls(config, ...)` builds the adapter for a `config_cls` instance."""
        keys = self._type_keys(config_cls)

        def declare(cls: type[T]) -> type[T]:
            for key in keys:
                other = self._keys.get(key)
                if other is not None and other is not config_cls:
                    raise TypeError(f"{self.kind} type {key!r} is declared twice: {other.__name__} and "
                                    f"{config_cls.__name__}")
            self._classes[config_cls] = cls
            self._keys.update(dict.fromkeys(keys, config_cls))
            return cls
        return declare

    def unregister(self, config_cls: type) -> None:
        """Forget an adapter (a test that registered its own)."""
        self._classes.pop(config_cls, None)
        self._keys = {k: c for k, c in self._keys.items() if c is not config_cls}

    def configs(self) -> tuple[type, ...]:
        """The registered config dataclasses, in registration order."""
        return tuple(self._classes)

    def build(self, cfg: Any, *args: Any, **kwargs: Any) -> Any:
        """The adapter for config instance `cfg` (not started or opened)."""
        cls = self._classes.get(type(cfg))
        if cls is None:
            raise TypeError(f"no {self.kind} is registered for config {type(cfg).__name__}")
        return cls(cfg, *args, **kwargs)

    @property
    def annotation(self) -> Any:
        """A type for a config dataclass field: the schema reads it as the tagged union of the registered configs
        (chosen by the mapping's `type` key), as they are when the station file is read."""
        return Annotated[Any, self]

    @staticmethod
    def _type_keys(config_cls: type) -> tuple[str, ...]:
        if not dataclasses.is_dataclass(config_cls):
            raise TypeError(f"{config_cls!r} is not a dataclass")
        hint = typing.get_type_hints(config_cls).get("type")
        if hint is None or get_origin(hint) is not Literal:
            raise TypeError(f"{config_cls.__name__} needs a field `type: Literal[...]` naming its key")
        return tuple(get_args(hint))

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._keys) or 'empty'})"


def registry_of(tp: Any) -> Registry | None:
    """The Registry that an `annotation` stands for, else None."""
    if get_origin(tp) is Annotated:
        return next((m for m in tp.__metadata__ if isinstance(m, Registry)), None)
    return None
