"""The settings of an explanation as one checked value.

`Settings` holds every option of caffast.explain that decides how the filters are found: explain
builds one from its keywords (or takes one, settings=), the loop and the solvers read it, the command
line makes its flags from its fields (the help beside each field, the choices of its Literal type,
the defaults), and `caffast run` records it in its config.json (`to_record`, `from_record`).  What
is explained (the model, the images, the layer, the targets) and the code a caller plugs in (an
objective, a reshape_transform) are explain's own arguments.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Mapping, Optional, Union, get_args, get_origin, get_type_hints

from .choices import (
    BackendName, ConstraintName, InitName, LossName, MapName, Mode, OptimizerName, SolverName, check_choice,
)  # fmt: skip
from .constraints import Constraint, as_constraint
from .loop import LoopSettings
from .losses import CLASS_LOSSES, DEFAULT_CLASS_LOSS, ClassLoss, as_class_loss
from .optimizers import MIN_LEARNING_RATE

MAX_COUNT = 2**63 - 1  # iterations are counted in int64, by the compiled solvers too
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
OLDER_RECORDS_LOSS: LossName = "release"  # the class-specific loss of runs recorded before the loss was a setting


class SettingError(ValueError):
    """A refused setting: the message is "`setting` `requirement`" ("max_iter must be at least 1,
    got 0"), so that the command line can name the setting by its flag instead."""

    def __init__(self, setting: str, requirement: str) -> None:
        super().__init__(f"{setting} {requirement}")
        self.setting = setting
        self.requirement = requirement


def _setting(default: Any, help: str, *, flag: bool = True, recorded: bool = True) -> Any:
    """A field of Settings: its default and a one-line description (the command line's help);
    `flag`: the commands take it as a flag; `recorded`: a run's config.json holds it (the settings a
    command changes that shape the result: not the backend, as every backend gives the same)."""
    return field(default=default, metadata={"help": help, "flag": flag, "recorded": recorded})


_LOSS_HELP = "; ".join(f"{name}: {loss.summary}" for name, loss in CLASS_LOSSES.items())


@dataclass(frozen=True)
class Settings:
    """Every setting of caffast.explain that decides how the filters are found, checked when it is
    made: a ValueError (a SettingError for a number) names the setting that is wrong and why.

    `dataclasses.replace(settings, max_iter=200)` is a copy with fields changed, checked again.
    `filter_constraint` and `class_loss` are the objects that `constraint` and `loss` name, made once
    here: everything below explain takes them.
    """

    mode: Mode = _setting(
        "oblivious", "oblivious: the filtered model keeps its output; specific: the filter raises each target")
    max_iter: int = _setting(1000, "iterations of the loop at most")
    lr: float = _setting(0.5, "the learning rate at the first iteration; it decays linearly to the end lr")
    min_error: float = _setting(
        1e-6, "a problem stops at a check where its loss moved by less than this since the previous check")
    check_every: int = _setting(50, "iterations between two checks of the stopping rule", flag=False, recorded=False)
    optimizer: OptimizerName = _setting("sgd", "the update; adam_tf1: TensorFlow 1's Adam (the TensorFlow release's)")
    end_lr: float = _setting(MIN_LEARNING_RATE, "where the learning rate's linear decay ends")
    constraint: ConstraintName = _setting(
        "l2norm", "how the filter is kept normalized: l2norm, on the unit sphere (the paper's); softmax, a "
        "distribution over the cells; gauss, a Gaussian whose mean is optimized")
    init: InitName = _setting("ones", "the filter's start: ones (the reference), or a normal draw")
    seed: Optional[int] = _setting(None, "the seed of the normal start (none: a fresh draw every time)")
    map: MapName = _setting(
        "abs", "how the filter becomes a map: abs: |f| (the reference); positive: the cells that raise the "
        "class; signed: f, drawn around zero")
    solver: SolverName = _setting(
        "gd", "gd: the reference loop; fast: tens of evaluations to a lower loss; exact: the minimizer "
        "(closed form for plain heads)")
    tolerance: float = _setting(
        1e-8, "fast and exact stop where the projected gradient is below it", flag=False, recorded=False)
    max_evaluations: int = _setting(
        30, "evaluations of the loss and its gradient fast takes per problem at most", flag=False, recorded=False)
    loss: Union[LossName, ClassLoss] = _setting(DEFAULT_CLASS_LOSS, f"the class-specific loss: {_LOSS_HELP}")
    backend: BackendName = _setting(
        "auto", "what computes: torch, cpp (on the CPU) or triton (on a CUDA GPU); auto: triton on a GPU, cpp on "
        "the CPU (every backend gives the same results)", recorded=False)
    fused: bool = _setting(
        True, "the head's closed form or the tail's affine prefix folded, where they apply (False: autograd "
        "through the whole tail)", flag=False, recorded=False)
    history: bool = _setting(
        False, "keep the maps at every check, for pictures of the convergence", flag=False, recorded=False)
    cuda_graphs: bool = _setting(
        True, "on a CUDA model, replay each evaluation of a generic tail from a captured CUDA graph", flag=False,
        recorded=False)

    filter_constraint: Constraint = field(init=False, repr=False, compare=False)
    class_loss: ClassLoss = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name, values in CHOICES.items():
            if name != "loss":  # a name or a ClassLoss: as_class_loss checks it below
                check_choice(name, getattr(self, name), values)
        self._set("max_iter", _integer("max_iter", self.max_iter, 1, MAX_COUNT))
        self._set("check_every", _integer("check_every", self.check_every, 1, MAX_COUNT))
        lr = _number("lr", self.lr)
        if not (math.isfinite(lr) and lr > 0):
            raise SettingError("lr", f"must be a finite positive number, got {lr!r}")
        min_error = _number("min_error", self.min_error)
        if not min_error >= 0:
            raise SettingError("min_error", f"must be zero or positive, got {min_error!r}")
        tolerance = _number("tolerance", self.tolerance)
        if not tolerance > 0:
            raise SettingError("tolerance", f"must be positive, got {tolerance!r}")
        if self.seed is not None:
            self._set("seed", _integer("seed", self.seed, *SEED_RANGE))
        end_lr = _number("end_lr", self.end_lr)
        if not 0 <= end_lr < math.inf:
            raise SettingError("end_lr", f"(where the schedule ends) must be zero or positive, got {end_lr!r}")
        evaluations = self.max_evaluations
        if isinstance(evaluations, bool) or not isinstance(evaluations, int) or evaluations < 1:
            raise SettingError("max_evaluations", f"must be a positive integer, got {evaluations!r}")
        for name, value in (("lr", lr), ("min_error", min_error), ("tolerance", tolerance), ("end_lr", end_lr)):
            self._set(name, value)
        self._set("filter_constraint", as_constraint(self.constraint))
        self._set("class_loss", as_class_loss(self.loss))

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def loop_settings(self) -> LoopSettings:
        """What the optimization loop (caffast.core.loop) and the compiled fused solvers read."""
        return LoopSettings(self.max_iter, self.lr, self.min_error, self.check_every, self.optimizer,
                            record=self.history, end_lr=self.end_lr)  # fmt: skip

    def to_record(self) -> dict[str, Any]:
        """The settings that shape the result, as JSON values by name: what `caffast run`'s
        config.json holds under "explain" (beside the targets)."""
        return {name: self.class_loss.name if name == "loss" else getattr(self, name) for name in RECORDED}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Settings:
        """The settings of a record (`to_record`'s, or the "explain" of a run's config.json, older ones
        too); the settings it does not hold take their defaults, and its other keys are left out."""
        completed = complete_record(record)
        return cls(**{name: completed[name] for name in RECORDED if name in completed})


def complete_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record with what an older caffast ran but did not record: before the class-specific loss was
    a setting, runs used the release's."""
    return {"loss": OLDER_RECORDS_LOSS, **record}


def _integer(name: str, value: object, low: int, high: int) -> int:
    """An int in [low, high]; bools are refused (True would count as 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        kind = "a bool" if isinstance(value, bool) else type(value).__name__
        raise SettingError(name, f"must be an integer, got {value!r} ({kind})")
    if int(value) < low:
        raise SettingError(name, f"must be at least {low}, got {value!r}")
    if int(value) > high:
        raise SettingError(name, f"must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = "a bool" if isinstance(value, bool) else type(value).__name__
        raise SettingError(name, f"must be a number, got {value!r} ({kind})")
    return float(value)


def _literal_values(hint: Any) -> tuple[str, ...]:
    """The values of a Literal type, or of the Literal in a Union; () for any other type."""
    if get_origin(hint) is Literal:
        return get_args(hint)
    if get_origin(hint) is Union:
        return next((values for part in get_args(hint) if (values := _literal_values(part))), ())
    return ()


SETTINGS_FIELDS = {setting.name: setting for setting in fields(Settings) if setting.init}
SETTING_NAMES = tuple(SETTINGS_FIELDS)
RECORDED = tuple(name for name, setting in SETTINGS_FIELDS.items() if setting.metadata["recorded"])
FLAG_SETTINGS = tuple(name for name, setting in SETTINGS_FIELDS.items() if setting.metadata["flag"])
TYPES = {name: hint for name, hint in get_type_hints(Settings).items() if name in SETTINGS_FIELDS}
# the choice settings and their valid values, from their Literal types
CHOICES = {name: values for name, hint in TYPES.items() if (values := _literal_values(hint))}

# The official releases' settings: the PyTorch release's scripts' defaults (500 iterations, lr 0.1,
# SGD from ones, a schedule down to 1e-5) and the TensorFlow release's fixed runs (TF1's Adam from a
# normal draw, lr 0.5, 1000 iterations, a schedule down to 0); both score classes with their own loss.
RELEASE_SETTINGS = Settings(max_iter=500, lr=0.1, optimizer="sgd", init="ones", end_lr=MIN_LEARNING_RATE, loss="release")
TF_RELEASE_SETTINGS = Settings(max_iter=1000, lr=0.5, optimizer="adam_tf1", init="normal", end_lr=0.0, loss="release")
