"""One name -> object registry for every pluggable part of the project (backbones, datasets,
objectives, encoders, re-rankers, ...).

Example::

    BACKBONES = Registry("backbone")

    @BACKBONES.register("resnet18", depth=18)
    def resnet18(**kw): ...

    BACKBONES.get("resnt18")
    # UnknownNameError: unknown backbone 'resnt18' (did you mean 'resnet18'?); valid backbones: resnet18, ...
"""
from __future__ import annotations

import difflib
from typing import Any, Dict, Generic, Iterator, List, Optional, Sequence, Type, TypeVar

from .errors import UserError

__all__ = ["Registry", "UnknownNameError"]

T = TypeVar("T")
_MISSING = object()


class UnknownNameError(UserError, ValueError):
    """A name that is not registered. ``kind``, ``name`` and ``valid`` describe the look-up
    (``None`` / empty when the error was raised with a message only)."""

    def __init__(self, message: str, *, kind: Optional[str] = None, name: Any = None, valid: Sequence[str] = ()):
        super().__init__(message)
        self.kind, self.name, self.valid = kind, name, tuple(valid)


def unknown_name_message(kind: str, name: Any, valid: Sequence[str], plural: Optional[str] = None) -> str:
    """``unknown <kind> 'name' (did you mean 'x'?); valid <kinds>: a, b, c``."""
    plural = plural or kind + "s"
    msg = f"unknown {kind} {name!r}"
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    if close:
        msg += f" (did you mean {close[0]!r}?)"
    return msg + f"; valid {plural}: {', '.join(valid) if valid else '(none registered)'}"


class Registry(Generic[T]):
    """Registered objects by name, with optional metadata per entry.

    Args:
        kind: What the entries are, singular (``"backbone"``); used in error messages.
        plural: Plural of ``kind`` for messages (default ``kind + "s"``).
        error: Exception class :meth:`get` raises for an unknown name; a subclass of
            :class:`UnknownNameError` (e.g. one that is also a package's own error class).
        also_valid: Names accepted elsewhere that messages list after the registered ones
            (``folder:PATH`` for datasets).

    A registry behaves like a read-only mapping (``name in reg``, ``reg[name]``, ``len``,
    iteration over the sorted names); :meth:`register` refuses a name that is taken.
    """

    def __init__(self, kind: str, *, plural: Optional[str] = None, error: Type[UnknownNameError] = UnknownNameError,
                 also_valid: Sequence[str] = ()):
        if not issubclass(error, UnknownNameError):
            raise TypeError(f"Registry({kind!r}): error must subclass UnknownNameError, got {error.__name__}")
        self.kind, self.plural = kind, plural or kind + "s"
        self.error, self.also_valid = error, tuple(also_valid)
        self._entries: Dict[str, T] = {}
        self._meta: Dict[str, dict] = {}

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={self.names()})"

    # -- registration ------------------------------------------------------------------------
    def register(self, name: str, obj: Any = _MISSING, **meta) -> Any:
        """Register ``obj`` under ``name``, or, without ``obj``, return a decorator that does.

        ``meta`` (any keywords) is kept beside the entry (see :meth:`meta`). The decorator
        returns the decorated object unchanged.

        Raises:
            ValueError: If ``name`` is not a non-empty string or is registered already.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if obj is _MISSING:
            def decorator(o):
                self._add(name, o, meta)
                return o

            return decorator
        self._add(name, obj, meta)
        return obj

    def _add(self, name: str, obj: Any, meta: dict) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj
        self._meta[name] = dict(meta)

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return its object (KeyError if absent)."""
        self._meta.pop(name, None)
        return self._entries.pop(name)

    def pop(self, name: str, default: Any = _MISSING) -> Any:
        """Like ``dict.pop``: remove ``name`` and return its object, or ``default``."""
        if name not in self._entries and default is not _MISSING:
            return default
        return self.unregister(name)

    # -- look-up ------------------------------------------------------------------------------
    def get(self, name: str) -> T:
        """The object registered under ``name``.

        Raises:
            UnknownNameError: (or the registry's ``error`` class) naming the valid names and the
                closest one.
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            pass
        valid = [*self.names(), *self.also_valid]
        raise self.error(unknown_name_message(self.kind, name, valid, self.plural), kind=self.kind, name=name,
                         valid=valid)

    def check(self, name: str) -> str:
        """``name`` if it is registered, else the error :meth:`get` raises."""
        self.get(name)
        return name

    def meta(self, name: str) -> dict:
        """The keywords ``name`` was registered with (a copy)."""
        self.get(name)
        return dict(self._meta[name])

    def names(self) -> List[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def items(self) -> List[tuple]:
        """``(name, object)`` pairs, sorted by name."""
        return [(n, self._entries[n]) for n in self.names()]

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._entries
        except TypeError:
            return False

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
