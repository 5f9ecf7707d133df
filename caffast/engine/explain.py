"""`explain`: one call from a model, images and a breakpoint to L2-CAF attention maps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backends import resolve_backend
from ..core.breakpoints import Layer, resolve_layer, split, unwrap
from ..core.layouts import ReshapeTransform
from ..core.choices import BackendName, ConstraintName, InitName, LossName, MapName, Mode, OptimizerName, SolverName
from ..core.constraints import initial_parameters, normalize_filter
from ..core.exact import stationarity
from ..core.finite import Suspects, check_loss
from ..core.folds import fold_prefix
from ..core.guard import frozen
from ..core.heads import detect_head, precompute
from ..core.loop import ProgressCallback
from ..core.losses import ClassLoss, Objective, UserObjective, as_dtype
from ..core.outputs import primary_output, select_rows
from ..core.problems import AutogradProblem, FusedProblem
from ..core.settings import SETTING_NAMES, Settings
from .flat import flat_maps, later_layers, quiet_trial, warn_flat
from .inputs import Target, Targets, TargetTable, check_images, model_device, target_table
from .solvers import optimize

@dataclass
class Explanation:
    """The result for N images and T targets each; every tensor is on the model's device.  On clips
    and volumes whose breakpoint map has a (D, H, W) grid, every (H, W) below is (D, H, W).

    filters: (N, T, H, W) the raw filter (for "gauss", the Gaussian it stands for);
    parameters: (N, T, *shape) the optimized variables ((H, W), or the Gaussian's mean (2,), (3,) on
    a (D, H, W) grid);
    maps: (N, T, H, W) the attention maps, as normalize_filter gives them for `map`;
    iterations: (N, T) optimizer steps taken; evaluations: (N, T) evaluations of the loss and its
    gradient (a forward and backward pass of the tail on the generic path) the solver used;
    loss: (N, T) the loss at the last step (for "fast" and "exact", the objective);
    objective: (N, T) the loss at the returned filter and gradient_norm: (N, T) the norm of its
    projected gradient there (float64), to compare solvers: a minimizer has a vanishing one;
    output: the unfiltered model output NT; targets: (N, T) the classes (top-1 for class-oblivious);
    tail: "fx" (extracted graph) or "hook" (whole model rerun); path: "fused" (the head's closed
    form, docs/design.md, 'The fused head') or "generic" (autograd through the tail); backend: the backend that ran;
    history: (iteration, maps) at every check when explain(history=True); features: the breakpoint's
    map A as an (N, C, H, W) grid, whatever the layer's layout; class_loss: the class-specific loss's
    name (None class-oblivious); flat: (N, T) True where the map is flat (a FlatMapWarning said why).
    """

    filters: torch.Tensor
    parameters: torch.Tensor
    maps: torch.Tensor
    iterations: torch.Tensor
    loss: torch.Tensor
    output: torch.Tensor
    targets: torch.Tensor
    objective: torch.Tensor
    gradient_norm: torch.Tensor
    evaluations: torch.Tensor
    mode: str
    constraint: str
    map: str
    solver: str
    tail: str
    path: str
    backend: str
    history: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    features: Optional[torch.Tensor] = None
    class_loss: Optional[str] = None
    flat: Optional[torch.Tensor] = None

    def upsample(self, size: Union[int, tuple[int, ...]]) -> torch.Tensor:
        """The maps at an image size, (N, T, h, w): bilinear, then min-max scaled to [0, 1] per map.
        Maps of clips and volumes resize trilinearly to a (D, H, W) `size` (an int: a cube)."""
        return upsample_maps(self.maps, size)


_INTERPOLATIONS = {2: "bilinear", 3: "trilinear"}  # by the rank of the maps' grid


def upsample_maps(maps: torch.Tensor, size: Union[int, tuple[int, ...]]) -> torch.Tensor:
    """(N, T, h, w) maps resized bilinearly to `size` and min-max scaled to [0, 1] per map; (N, T, d,
    h, w) maps of clips and volumes trilinearly, to a (D, H, W) size."""
    if maps.dim() - 2 not in _INTERPOLATIONS:
        raise ValueError(f"maps must be (N, T, H, W) or (N, T, D, H, W); got {tuple(maps.shape)}")
    n, t, *grid = maps.shape
    size = (size,) * len(grid) if isinstance(size, int) else tuple(size)
    if len(size) != len(grid):
        raise ValueError(f"size {size} has {len(size)} axes; the maps' grid {tuple(grid)} has {len(grid)}")
    mode = _INTERPOLATIONS[len(grid)]
    resized = F.interpolate(maps.reshape(n * t, 1, *grid), size=size, mode=mode, align_corners=False)
    resized = resized.reshape(n, t, *size)
    axes = tuple(range(-len(grid), 0))
    low = resized.amin(dim=axes, keepdim=True)
    high = resized.amax(dim=axes, keepdim=True)
    return (resized - low) / (high - low).clamp_min(torch.finfo(resized.dtype).tiny)


def _scorer_names(scores: Optional[list]) -> Callable[[int], Optional[str]]:
    """The name of the callable target of problem p in messages ("the target MyScore"); None for a class."""

    def name(problem: int) -> Optional[str]:
        score = scores[problem] if scores is not None else None
        return None if score is None else f"the target {getattr(score, '__name__', type(score).__name__)}"

    return name


def _problem_names(mode: str, image_index: torch.Tensor, targets: torch.Tensor,
                   scores: Optional[list]) -> Callable[[int], str]:  # fmt: skip
    """The name of problem p in messages: "(image 0, target 207)", "(image 0, the target MyScore)" for
    a callable, or "(image 0)" class-oblivious."""
    classes = targets.flatten()
    scorer = _scorer_names(scores)
    if mode == "oblivious":
        return lambda p: f"(image {int(image_index[p])})"
    return lambda p: f"(image {int(image_index[p])}, {scorer(p) or f'target {int(classes[p])}'})"



def _layer_name(model: nn.Module, layer: Layer) -> str:
    """The breakpoint's name for messages (a wrapper's own prefix, "module.", included or not)."""
    return layer if isinstance(layer, str) else resolve_layer(unwrap(model)[0], layer)[0]


def _problem_target(table: TargetTable, targets: torch.Tensor, problem: int) -> Target:
    """Problem p's target as explain takes it: its class, or the callable that scores it."""
    score = table.scores[problem] if table.scores is not None else None
    return score if score is not None else int(targets.flatten()[problem])


def _nearest_working_layer(model: nn.Module, image: torch.Tensor, layer: str, target: Optional[list[Target]],
                           trial: Settings, objective: Optional[UserObjective]) -> Optional[str]:  # fmt: skip
    """The first layer after `layer` whose map for `image` is not flat after the `trial` settings."""
    for candidate in later_layers(model, image, layer):
        result = quiet_trial(lambda: explain(model, image, candidate, target, settings=trial, objective=objective))
        if result is not None and not result.flat.any():
            return candidate
    return None


def _chosen_settings(keywords: dict[str, object], settings: Optional[Settings]) -> Settings:
    """explain's settings: `settings`, or else its keywords; a keyword away from its default beside
    `settings` would be ignored, and is refused."""
    if settings is None:
        return Settings(**keywords)
    if not isinstance(settings, Settings):
        raise TypeError(f"settings must be a caffast.Settings, not {type(settings).__name__}")
    defaults = Settings()
    given = [name for name, value in keywords.items()
             if type(value) is not type(getattr(defaults, name)) or value != getattr(defaults, name)]  # fmt: skip
    if given:
        raise TypeError(
            f"explain takes its settings either as keywords or as settings=, not both: got settings= and "
            f"{', '.join(given)}; pass dataclasses.replace(settings, {given[0]}=...) instead"
        )
    return settings


def explain(
    model: nn.Module,
    images: torch.Tensor,
    layer: Layer,
    targets: Targets = None,
    *,
    mode: Mode = Settings.mode,
    max_iter: int = Settings.max_iter,
    lr: float = Settings.lr,
    min_error: float = Settings.min_error,
    check_every: int = Settings.check_every,
    optimizer: OptimizerName = Settings.optimizer,
    end_lr: float = Settings.end_lr,
    constraint: ConstraintName = Settings.constraint,
    init: InitName = Settings.init,
    seed: Optional[int] = Settings.seed,
    objective: Optional[UserObjective] = None,
    backend: BackendName = Settings.backend,
    fused: bool = Settings.fused,
    history: bool = Settings.history,
    map: MapName = Settings.map,
    solver: SolverName = Settings.solver,
    tolerance: float = Settings.tolerance,
    max_evaluations: int = Settings.max_evaluations,
    cuda_graphs: bool = Settings.cuda_graphs,
    layout: Optional[str] = None,
    reshape_transform: Optional[ReshapeTransform] = None,
    loss: Union[LossName, ClassLoss] = Settings.loss,
    settings: Optional[Settings] = None,
    progress: Optional[ProgressCallback] = None,
) -> Explanation:
    """Explain `model` on `images` at the breakpoint `layer` with L2-CAF.

    Every (image, target) pair is its own problem with its own filter, schedule and stopping rule, all
    solved in one batch; the result equals solving them one by one with the reference loop.  The model
    is handed back unchanged.  `targets` are the classes (or callables that score one image's output) of
    mode='specific', in any form caffast.engine.inputs.target_table takes.
    The keywords from `mode` on are the fields of caffast.Settings, checked there; `settings=` passes
    them as one Settings instead (for tools that hold one; the keywords are then left out).
    `fused=False` runs the generic path through the whole tail even where
    the head could be fused or the tail's affine prefix folded (caffast.core.folds);
    `history=True` keeps the maps at every check (every `check_every` iterations), for pictures of
    the convergence.  The learning rate decays linearly from `lr` to `end_lr` (1e-5 as in the PyTorch
    release; the TensorFlow release's ends at 0); `optimizer="adam_tf1"` is TensorFlow 1's Adam, the
    TensorFlow release's.  `map` picks how the filter becomes a map (normalize_filter).  `solver="exact"`
    goes past where the reference loop stops: the minimizer in closed form for fused heads with the
    l2norm constraint (class-specific, or class-oblivious without a ReLU), otherwise a descent from
    the loop's answer until the projected gradient is below `tolerance`, no step lowers the loss any
    more, or 10 * max_iter steps were tried (caffast.core.exact); `gradient_norm` says where it ended.
    `solver="fast"` reaches the loop's loss or lower in a few evaluations (caffast.core.fast): at most
    `max_evaluations` per problem, fewer where the projected gradient falls below `tolerance`.
    On a CUDA model the loop replays each evaluation of a generic tail from a captured CUDA graph
    (caffast.backends.torch.graphs); `cuda_graphs=False` evaluates eagerly.
    A loss or filter that stops being finite raises caffast.NonFiniteError naming the problem and the
    cause (caffast.core.finite).
    `loss` is the class-specific loss of class targets (caffast.core.losses.CLASS_LOSSES): "margin"
    (the default: the target logit against the mean of the others), "logit", "log_softmax", or
    "release", the official releases' (the target logit against the sum of the others, which on
    trained networks with many classes mostly explains the other classes: use it for parity).
    `objective(FT, NT)` replaces the class-oblivious loss (one loss per sample).
    `progress(share)` is told, at every check of the reference loop, the share of its work done (0 to
    1), for a progress bar; it changes no result.  The compiled fused loops (backends cpp and triton)
    run whole in one call and do not report, nor do solver="fast" and the descent of "exact".
    `layout` ("nchw", "nhwc", "tokens"; "ncdhw", "ndhwc" for clips and volumes) says where the grid
    lies in the layer's output where it cannot be told from the shape and the model; `reshape_transform` (pytorch-grad-cam's, for ViT and Swin)
    defines it instead (caffast.core.layouts).
    """
    arguments = dict(locals())  # the parameters, before any other name is bound
    keywords = {name: arguments[name] for name in SETTING_NAMES}
    if torch.is_inference_mode_enabled():
        raise ValueError(
            "explain differentiates the network with respect to its filter, and torch.inference_mode() turns "
            "autograd off: call explain outside the inference_mode block, or inside "
            "`with torch.inference_mode(False):` (tensors made in inference mode may be passed)"
        )
    chosen = _chosen_settings(keywords, settings)
    mode, constraint, class_loss = chosen.mode, chosen.filter_constraint, chosen.class_loss
    if objective is not None and mode != "oblivious":
        raise ValueError("objective replaces the class-oblivious loss: use it with mode='oblivious'")
    images = check_images(images)
    device = model_device(model)
    backend = resolve_backend(chosen.backend, device)

    with frozen(model):
        images = images.to(device)
        capture, tail = split(model, layer, images, layout, reshape_transform)
        table = target_table(mode, targets, capture.output)
        targets = table.classes
        batch, per_image = targets.shape
        image_index = torch.arange(batch, device=device).repeat_interleave(per_image)
        features, grid_layout = capture.features, capture.layout
        grid = grid_layout.grid
        dtype = features.dtype if features.dtype in (torch.float32, torch.float64) else torch.float32

        reference = select_rows(as_dtype(capture.output, dtype), image_index)
        class_targets = targets.flatten()
        weights = None
        if mode == "specific" and (class_targets >= 0).any():
            weights = class_loss.weights(class_targets, primary_output(reference).shape[1], dtype)
        # the fused algebra holds for class targets on a channels-first map
        plain = objective is None and table.scores is None and grid_layout.channels_first
        head = detect_head(tail, grid) if chosen.fused and plain else None
        initial = initial_parameters(constraint, chosen.init, image_index.numel(), grid, chosen.seed, dtype, device)
        fused_head = None if head is None else precompute(head, features, image_index, mode, class_loss, class_targets)
        if fused_head is not None:
            problem = FusedProblem(fused_head, constraint)
        else:
            scoring = Objective(mode, reference, class_loss, class_targets, weights, objective, table.scores)
            # the compiled filters take float32/64 features; half-precision ones get the torch multiply
            multiply = backend.filter_multiply(constraint) if features.dtype == dtype else None
            if not grid_layout.channels_first:
                multiply = grid_layout.multiply_with(constraint)
            folded = fold_prefix(tail, features) if chosen.fused and grid_layout.channels_first else None
            problem = AutogradProblem(tail, features, image_index, scoring, constraint, grid, multiply, folded)

        names = _problem_names(mode, image_index, targets, table.scores)
        suspects = Suspects(names, chosen.lr, _layer_name(model, layer),
                            features, grid, objective is not None, _scorer_names(table.scores))  # fmt: skip
        solution = optimize(problem, fused_head, backend, initial, chosen, suspects, progress)
        kinked = fused_head is not None and fused_head.parts == 2 and constraint.on_sphere
        mirrored = FusedProblem(fused_head, constraint, zeros_negative=True) if kinked else None
        final_objective, gradient_norm = stationarity(problem, solution.params, constraint, mirrored)
        check_loss(final_objective, suspects)
        if chosen.solver != "gd":
            solution.loss = final_objective
            if chosen.history:  # the answer is the last frame
                solution.history.append((int(solution.iterations.max()), solution.params.clone()))
        params = solution.params.to(dtype)
        filters = constraint.filters(params, grid)
        flat = flat_maps(filters, constraint.filters(initial, grid))

        def nearest_working_layer() -> Optional[str]:
            """Where the first flat problem's map is not flat (searched inside `frozen`: in eval mode)."""
            first = int(flat.nonzero()[0])
            target = None if mode == "oblivious" else [_problem_target(table, targets, first)]
            image = int(image_index[first])
            # one step, with the settings that decide whether the map moves at all
            trial = Settings(mode=mode, max_iter=1, check_every=1, lr=chosen.lr, constraint=chosen.constraint,
                             init=chosen.init, seed=chosen.seed, loss=chosen.loss)  # fmt: skip
            return _nearest_working_layer(model, images[image : image + 1], _layer_name(model, layer), target, trial,
                                          objective)  # fmt: skip

        warn_flat(flat, gradient_norm, names, _layer_name(model, layer), nearest_working_layer)

    shape = (batch, per_image)

    def final_maps(values: torch.Tensor) -> torch.Tensor:
        return normalize_filter(values.to(dtype), constraint, shape=grid, map=chosen.map).reshape(*shape, *grid)

    return Explanation(
        filters=filters.reshape(*shape, *grid),
        parameters=params.reshape(*shape, *params.shape[1:]),
        maps=final_maps(params),
        iterations=solution.iterations.reshape(shape),
        loss=solution.loss.to(dtype).reshape(shape),
        output=capture.output,
        targets=targets,
        objective=final_objective.double().reshape(shape),
        gradient_norm=gradient_norm.double().reshape(shape),
        evaluations=solution.evaluations.reshape(shape),
        mode=mode,
        constraint=constraint.name,
        map=chosen.map,
        solver=chosen.solver,
        tail=tail.kind,
        path="generic" if head is None else "fused",
        backend=backend.name,
        history=[(step, final_maps(values)) for step, values in solution.history],
        features=grid_layout.to_grid(features),
        class_loss=class_loss.name if mode == "specific" else None,
        flat=flat.reshape(shape),
    )
