"""Registries and option specs: how the parts of a block are named, found, checked and documented.

A nonlocal block is a **kernel** (how two positions are compared), a **graph mode** (which graph over the
positions the kernel builds: full, criss-cross, over channels, ...), a **filter** (what is done with the graph)
and an output (docs/framework.md). Each kind of part has one :class:`Registry`; the library registers its own
parts exactly the way a user registers theirs (``nonlocalnet.register_kernel``, ``register_graph``,
``register_filter``, ``register_block``), and every list of names the library prints — in errors, in
``nonlocalnet blocks``, in docs — is read from a registry, never written out by hand.

A part's options are :class:`Option` s: a default, a one-line description and a check that names the option
and what it expects. The option docs and the error messages come from the same spec.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def did_you_mean(name: Any, valid: list[str]) -> str:
    """`` (did you mean 'x'?)`` when a valid name is close to ``name``, else an empty string."""
    if not isinstance(name, str):
        return ""
    close = difflib.get_close_matches(name, valid, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Registry(Mapping[str, T], Generic[T]):
    """Names → parts of one kind, in registration order (a read-only ``Mapping`` for everyone but
    :meth:`register`).

    ``kind`` names the part in messages (``"kernel"``), ``arg`` the option that takes a name (``"kernel"``):
    ``registry["foo"]`` raises ``ValueError("kernel: unknown kernel 'foo'; valid: ...")``.
    """

    def __init__(self, kind: str, arg: str | None = None):
        self.kind, self.arg = kind, arg or kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T, *, replace: bool = False) -> T:
        """Add ``item`` under ``name``; an existing name is an error unless ``replace=True``."""
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"name: a {self.kind} name must be a Python identifier (letters, digits, _), "
                             f"got {name!r}")
        if name in self._items and not replace:
            raise ValueError(f"name: a {self.kind} named {name!r} is already registered; pass replace=True to "
                             f"replace it")
        self._items[name] = item
        return item

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests and for a user's temporary parts)."""
        self[name]  # noqa: B018 - the error for an unknown name
        del self._items[name]

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            valid = list(self._items)
            raise ValueError(f"{self.arg}: unknown {self.kind} {name!r}{did_you_mean(name, valid)}; valid: "
                             f"{', '.join(valid)}") from None

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._items
        except TypeError:  # unhashable
            return False

    def get(self, name: Any, default: Any = None) -> Any:
        return self._items.get(name, default) if name in self else default

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        return list(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._items)})"


# --------------------------------------------------------------------------------------- option specs
@dataclass(frozen=True)
class Option:
    """One option of a part: its default, what it is (one line, for docs and ``--help``) and a check.

    ``check(name, value)`` raises ``TypeError``/``ValueError`` naming the option and what it expects, and returns
    the value to use (it never converts silently: a check that accepts a value returns it as it is, or a
    normalized form that means the same, e.g. ``None`` resolved to the default).
    """

    default: Any
    doc: str
    check: Callable[[str, Any], Any] | None = None

    def resolve(self, name: str, value: Any) -> Any:
        return value if self.check is None else self.check(name, value)


def check_options(owner: str, specs: Mapping[str, Option], given: Mapping[str, Any]) -> dict[str, Any]:
    """Every option of ``specs``: ``given`` (checked) or the default; an option ``specs`` does not have is an
    error that lists the valid ones. ``owner`` names the part in that message (``"filter 'bernstein'"``)."""
    unknown = [k for k in given if k not in specs]
    if unknown:
        valid = list(specs)
        raise ValueError(f"option {unknown[0]!r} does not apply to {owner}{did_you_mean(unknown[0], valid)}; "
                         f"its options: {', '.join(valid) or '(none)'}")
    return {k: spec.resolve(k, given[k]) if k in given else spec.default for k, spec in specs.items()}


def options_doc(specs: Mapping[str, Option]) -> str:
    """``name (default): doc`` lines, for docstrings and ``nonlocalnet blocks --options``."""
    return "\n".join(f"{k} (default {spec.default!r}): {spec.doc}" for k, spec in specs.items())


# the checks every part uses (the messages the tests and users see)
def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def int_at_least(low: int, what: str = "") -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}{f' ({what})' if what else ''}, got {value!r}")
        return value
    return check


def int_between(low: int, high: int, what: str = "") -> Callable[[str, Any], int]:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{name}: expected an int in [{low}, {high}]{f' ({what})' if what else ''}, "
                             f"got {value!r}")
        return value
    return check


def positive_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a positive finite number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
    return value


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {value!r}")
    return value


def one_of(*valid: Any) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if value not in valid:
            raise ValueError(f"{name}: unknown {name} {value!r}; valid: {', '.join(map(str, valid))}")
        return value
    return check
