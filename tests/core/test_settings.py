"""caffast.Settings: every choice its Literal type names is taken and nothing else, the command line's
flags offer exactly those, the release constants are the releases' settings, and a run's record
reads back."""

import dataclasses
import json
from typing import get_args

import pytest
import torch

import caffast
from caffast import RELEASE_SETTINGS, TF_RELEASE_SETTINGS, Settings
from caffast.apps.cli import COMMAND_SETTINGS, _release_defaults, build_parser
from caffast.apps.common import command_settings
from caffast.backends import BACKENDS
from caffast.core import choices
from caffast.core.constraints import CONSTRAINTS, INITS, MAPS
from caffast.core.loop import LoopSettings
from caffast.core.losses import CLASS_LOSSES, MODES
from caffast.core.optimizers import OPTIMIZERS
from caffast.core.settings import CHOICES, FLAG_SETTINGS, OLDER_RECORDS_LOSS, RECORDED, SettingError
from caffast.engine.solvers import SOLVERS

LITERALS = {"mode": choices.Mode, "optimizer": choices.OptimizerName, "constraint": choices.ConstraintName,
            "init": choices.InitName, "map": choices.MapName, "solver": choices.SolverName,
            "loss": choices.LossName, "backend": choices.BackendName}  # fmt: skip
# what `caffast run`'s config.json has held under "explain" (beside "targets") since the loss was recorded
RUN_RECORD = {"mode", "max_iter", "lr", "min_error", "map", "solver", "constraint", "optimizer", "init", "seed", "end_lr", "loss"}


def test_the_choices_are_the_literal_types():
    assert {name: get_args(literal) for name, literal in LITERALS.items()} == CHOICES
    implemented = {"mode": MODES, "optimizer": OPTIMIZERS, "constraint": tuple(CONSTRAINTS), "init": INITS, "map": MAPS,
                   "solver": SOLVERS, "loss": tuple(CLASS_LOSSES), "backend": BACKENDS}  # fmt: skip
    assert implemented == CHOICES


@pytest.mark.parametrize("name,value", [(name, value) for name, values in CHOICES.items() for value in values])
def test_every_choice_is_taken(name, value):
    settings = Settings(**{name: value})
    assert getattr(settings, name) == value
    assert settings.filter_constraint is CONSTRAINTS[settings.constraint]
    assert settings.class_loss is CLASS_LOSSES[settings.loss]


@pytest.mark.parametrize("name", list(CHOICES))
def test_another_choice_is_refused_naming_the_valid_ones(name):
    with pytest.raises(ValueError) as refused:
        Settings(**{name: "bogus"})
    message = str(refused.value)
    assert name in message and "'bogus'" in message
    assert all(repr(value) in message for value in CHOICES[name]), message


@pytest.mark.parametrize(
    "name,value,message",
    [("max_iter", 0, "max_iter must be at least 1, got 0"), ("lr", float("inf"), "lr must be a finite positive number"),
     ("min_error", -1.0, "min_error must be zero or positive, got -1.0"), ("end_lr", -1.0, "end_lr (where the schedule ends)"),
     ("tolerance", 0.0, "tolerance must be positive, got 0.0"), ("max_evaluations", 0, "max_evaluations must be a positive"),
     ("seed", 1.5, "seed must be an integer, got 1.5 (float)")],
)  # fmt: skip
def test_a_number_out_of_range_names_the_setting(name, value, message):
    with pytest.raises(SettingError) as refused:
        Settings(**{name: value})
    assert str(refused.value).startswith(message) and refused.value.setting == name
    assert str(refused.value) == f"{name} {refused.value.requirement}"


def test_numbers_are_held_as_python_numbers_and_changes_are_checked_again():
    import numpy as np

    settings = Settings(max_iter=np.int64(3), lr=np.float32(0.25), seed=np.int64(4), end_lr=0)
    assert (type(settings.max_iter), type(settings.lr), type(settings.seed), type(settings.end_lr)) == (int, float, int, float)
    assert dataclasses.replace(settings, max_iter=5).max_iter == 5
    with pytest.raises(ValueError, match="max_iter"):
        dataclasses.replace(settings, max_iter=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.max_iter = 5


def test_the_loop_reads_its_settings_from_one_method():
    settings = Settings(max_iter=7, lr=0.25, min_error=0.5, check_every=3, optimizer="adam", end_lr=0.0, history=True)
    assert settings.loop_settings() == LoopSettings(7, 0.25, 0.5, 3, "adam", record=True, end_lr=0.0)


def test_the_release_constants_are_the_releases_settings():
    """The PyTorch release's scripts: --max_iter 500, --lr 0.1, --min_error 1e-6, SGD from ones with a
    schedule to 1e-5, the l2norm filter; the TensorFlow release's runs: TF1's Adam from a normal draw,
    lr 0.5, 1000 iterations, a schedule to 0.  Both raise the target against the sum of the others."""
    assert RELEASE_SETTINGS == Settings(max_iter=500, lr=0.1, min_error=1e-6, optimizer="sgd", init="ones", end_lr=1e-5,
                                        constraint="l2norm", loss="release")  # fmt: skip
    assert TF_RELEASE_SETTINGS == Settings(max_iter=1000, lr=0.5, min_error=1e-6, optimizer="adam_tf1", init="normal",
                                           end_lr=0.0, constraint="l2norm", loss="release")  # fmt: skip


def _commands():
    (commands,) = [action for action in build_parser()._actions if action.dest == "command"]
    return commands.choices


@pytest.mark.parametrize("command", ["explain", "run", "class_oblivious", "class_specific"])
def test_the_flags_offer_exactly_the_literal_choices(command):
    actions = {action.dest: action for action in _commands()[command]._actions}
    flagged = [name for name in FLAG_SETTINGS if name in actions]
    assert flagged == [name for name in FLAG_SETTINGS if command in ("explain", "run") or name != "mode"]
    for name in flagged:
        assert tuple(actions[name].choices or ()) == CHOICES.get(name, ()), name


def test_the_commands_take_their_defaults_from_the_settings():
    parser = build_parser()
    for argv, expected in (
        (["explain", "a.png"], COMMAND_SETTINGS),
        (["run", "data", "--out", "out"], COMMAND_SETTINGS),
        (["class_specific", "--input_img", "a.png"], RELEASE_SETTINGS),
        (["class_oblivious", "--input_img", "a.png", "--tf-release"], TF_RELEASE_SETTINGS),
    ):
        args = parser.parse_args(argv)
        if argv[0].startswith("class_"):
            _release_defaults(args)
        assert command_settings(args) == expected, argv
    assert COMMAND_SETTINGS == Settings(mode="specific")
    given = parser.parse_args(["class_specific", "--input_img", "a.png", "--tf-release", "--max_iter", "120", "--lr", "0.3"])
    _release_defaults(given)
    assert command_settings(given) == dataclasses.replace(TF_RELEASE_SETTINGS, max_iter=120, lr=0.3)


def test_a_record_reads_back():
    settings = Settings(mode="specific", max_iter=7, lr=0.25, min_error=0.0, optimizer="adam_tf1", end_lr=0.0,
                        constraint="softmax", init="normal", seed=3, map="signed", solver="exact", loss="logit")  # fmt: skip
    record = json.loads(json.dumps(settings.to_record()))
    assert set(record) == set(RECORDED) == RUN_RECORD
    assert Settings.from_record(record) == settings
    assert Settings.from_record({**record, "targets": [3, 7]}) == settings  # a run's record holds its targets too
    assert Settings.from_record(Settings().to_record()) == Settings()
    older = {key: value for key, value in record.items() if key != "loss"}  # written before the loss was a setting
    assert Settings.from_record(older) == dataclasses.replace(settings, loss=OLDER_RECORDS_LOSS) and OLDER_RECORDS_LOSS == "release"


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 5)).eval()  # fmt: skip
    return model, torch.randn(2, 3, 9, 9)


def test_explain_takes_its_settings_as_keywords_or_as_one_object(small):
    model, images = small
    keywords = dict(mode="specific", max_iter=20, lr=0.3, solver="fast", map="positive", loss="logit")
    by_keywords = caffast.explain(model, images, "0", [1, 2], **keywords)
    by_settings = caffast.explain(model, images, "0", [1, 2], settings=Settings(**keywords))
    assert torch.equal(by_keywords.maps, by_settings.maps) and by_settings.solver == "fast"
    same = caffast.explain(model, images, "0", [1, 2], settings=Settings(**keywords), max_iter=1000, backend="auto")
    assert torch.equal(same.maps, by_settings.maps)  # keywords at their defaults change nothing
    with pytest.raises(TypeError, match="not both: got settings= and max_iter, lr"):
        caffast.explain(model, images, "0", [1, 2], settings=Settings(**keywords), max_iter=30, lr=0.1)
    with pytest.raises(TypeError, match="settings must be a caffast.Settings"):
        caffast.explain(model, images, "0", settings=keywords)
