"""Validation of the named options (mode, optimizer, map, backend, ...): one message for every one."""

from __future__ import annotations

from typing import Sequence, TypeVar

Choice = TypeVar("Choice")


def check_choice(kind: str, value: Choice, choices: Sequence[object]) -> Choice:
    """Raise a ValueError naming the valid choices when `value` is not one of them."""
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choose one of {', '.join(map(repr, choices))}")
    return value
