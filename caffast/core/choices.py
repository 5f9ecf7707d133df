"""The named options (mode, optimizer, map, backend, ...): their valid values, and one message for
every one that is refused.

Each Literal type is the one list of its option's values: the modules that implement an option take
their tuple from it with typing.get_args, and caffast.core.settings and the command line read it.
"""

from __future__ import annotations

from typing import Literal, Sequence, TypeVar

Mode = Literal["oblivious", "specific"]
ConstraintName = Literal["l2norm", "softmax", "gauss"]
InitName = Literal["ones", "normal"]
MapName = Literal["abs", "positive", "signed"]
OptimizerName = Literal["sgd", "adam", "adam_tf1"]
SolverName = Literal["gd", "fast", "exact"]
BackendName = Literal["auto", "torch", "cpp", "triton"]
LossName = Literal["release", "margin", "logit", "log_softmax"]

Choice = TypeVar("Choice")


def check_choice(kind: str, value: Choice, choices: Sequence[object]) -> Choice:
    """Raise a ValueError naming the valid choices when `value` is not one of them."""
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choose one of {', '.join(map(repr, choices))}")
    return value
