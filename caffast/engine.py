"""`explain`: one call from a model, images and a breakpoint to L2-CAF attention maps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backends import filter_multiply, resolve_backend, solve_fused
from .backends.autograd import AutogradProblem
from .exact import DESCENT_STEPS_PER_ITERATION, SOLVERS, closed_form, descend, has_closed_form, stationarity
from .filters import CONSTRAINTS, INITS, MAPS, check_choice, constrained_filter, initial_parameters, normalize_filter
from .guard import frozen
from .heads import FusedHead, FusedProblem, detect_head, precompute
from .losses import MODES, Objective, UserObjective, class_signs
from .optim import OPTIMIZERS
from .solve import LoopSettings, Problem, Solution, solve
from .split import Layer, split

Targets = Union[None, int, Sequence[int], torch.Tensor]


@dataclass
class Explanation:
    """The result for N images and T targets each; every tensor is on the model's device.

    filters: (N, T, H, W) the raw filter (for "gauss", the Gaussian it stands for);
    parameters: (N, T, *shape) the optimized variables ((H, W), or the Gaussian's mean (2,));
    maps: (N, T, H, W) the attention maps, as normalize_filter gives them for `map`;
    iterations: (N, T) optimizer steps taken; loss: (N, T) the loss at the last step (for "exact",
    the objective);
    objective: (N, T) the loss at the returned filter and gradient_norm: (N, T) the norm of its
    projected gradient there (float64), to compare solvers: a minimizer has a vanishing one;
    output: the unfiltered model output NT; targets: (N, T) the classes (top-1 for class-oblivious);
    tail: "fx" (extracted graph) or "hook" (whole model rerun); path: "fused" (the head's closed
    form, DESIGN.md section 3) or "generic" (autograd through the tail); backend: the backend that ran;
    history: (iteration, maps) at every check when explain(history=True).
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
    mode: str
    constraint: str
    map: str
    solver: str
    tail: str
    path: str
    backend: str
    history: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    def upsample(self, size: Union[int, tuple[int, int]]) -> torch.Tensor:
        """The maps at an image size, (N, T, h, w): bilinear, then min-max scaled to [0, 1] per map."""
        return upsample_maps(self.maps, size)


def upsample_maps(maps: torch.Tensor, size: Union[int, tuple[int, int]]) -> torch.Tensor:
    """(N, T, h, w) maps resized bilinearly to `size` and min-max scaled to [0, 1] per map."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    n, t, h, w = maps.shape
    resized = F.interpolate(maps.reshape(n * t, 1, h, w), size=size, mode="bilinear", align_corners=False)
    resized = resized.reshape(n, t, *size)
    low = resized.amin(dim=(-2, -1), keepdim=True)
    high = resized.amax(dim=(-2, -1), keepdim=True)
    return (resized - low) / (high - low).clamp_min(torch.finfo(resized.dtype).tiny)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _check_images(images: object) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape (N, C, H, W), not {type(images).__name__}")
    if images.dim() != 4:
        hint = " (add the batch dimension with images.unsqueeze(0))" if images.dim() == 3 else ""
        raise ValueError(f"images must have shape (N, C, H, W); got {tuple(images.shape)}{hint}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch; pass at least one image")
    return images


def _check_settings(max_iter: int, lr: float, min_error: float, check_every: int, tolerance: float) -> None:
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    if not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be a positive integer, got {check_every!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not min_error >= 0:
        raise ValueError(f"min_error must be zero or positive, got {min_error!r}")
    if not tolerance > 0:
        raise ValueError(f"tolerance must be positive, got {tolerance!r}")


def _resolve_targets(mode: str, targets: Targets, output: torch.Tensor) -> torch.Tensor:
    """(N, T) class indices: the top-1 class when none are given."""
    batch = output.shape[0]
    if mode == "oblivious":
        if targets is not None:
            raise ValueError("targets apply to mode='specific'; class-oblivious explains the whole output")
        if output.dim() == 2:
            return output.argmax(dim=1, keepdim=True)
        return torch.full((batch, 1), -1, dtype=torch.long, device=output.device)
    if output.dim() != 2:
        raise ValueError(
            f"mode='specific' needs class scores of shape (N, K); the model outputs {tuple(output.shape)}: "
            "use mode='oblivious' for other outputs"
        )
    classes = output.shape[1]
    if targets is None:
        resolved = output.argmax(dim=1, keepdim=True)
    elif isinstance(targets, int):
        resolved = torch.full((batch, 1), targets, dtype=torch.long)
    elif isinstance(targets, torch.Tensor):
        if targets.dim() != 2 or targets.shape[0] != batch or targets.dtype.is_floating_point:
            raise ValueError(
                f"a targets tensor must be integer with shape (N, T) = ({batch}, T); got {targets.dtype} "
                f"{tuple(targets.shape)} (for one class per image use targets.view(-1, 1))"
            )
        resolved = targets.long()
    else:
        classes_each = list(targets)
        if not classes_each or not all(isinstance(c, int) for c in classes_each):
            raise ValueError(f"targets must be None, an int, a list of ints or an (N, T) tensor; got {targets!r}")
        resolved = torch.tensor(classes_each, dtype=torch.long).repeat(batch, 1)
    resolved = resolved.to(output.device)
    if resolved.numel() == 0 or resolved.min() < 0 or resolved.max() >= classes:
        raise ValueError(f"targets must be class indices in [0, {classes}); got {resolved.tolist()}")
    return resolved


def _optimize(
    solver: str, problem: Problem, fused_head: Optional[FusedHead], backend: str, constraint: str,
    initial: torch.Tensor, settings: LoopSettings, tolerance: float,
) -> Solution:
    """The reference loop's answer; for solver="exact", the closed form where there is one, else the
    loop's answer refined by a descent (caffast.exact)."""
    if solver == "exact" and has_closed_form(fused_head, constraint):
        zeros = torch.zeros(initial.shape[0], dtype=torch.long, device=initial.device)
        return Solution(params=closed_form(fused_head).view(initial.shape), iterations=zeros, loss=zeros.double())
    if fused_head is not None:
        solution = solve_fused(backend, fused_head, constraint, initial.double(), settings)
    else:
        solution = solve(problem, initial, settings)
    if solver == "exact":
        budget = DESCENT_STEPS_PER_ITERATION * settings.max_iter
        params, steps = descend(problem, solution.params, constraint, tolerance, budget)
        solution.params, solution.iterations = params, solution.iterations + steps
    return solution


def explain(
    model: nn.Module,
    images: torch.Tensor,
    layer: Layer,
    mode: str = "oblivious",
    targets: Targets = None,
    max_iter: int = 1000,
    lr: float = 0.5,
    min_error: float = 1e-6,
    check_every: int = 50,
    optimizer: str = "sgd",
    constraint: str = "l2norm",
    init: str = "ones",
    seed: Optional[int] = None,
    objective: Optional[UserObjective] = None,
    backend: str = "auto",
    fused: bool = True,
    history: bool = False,
    map: str = "abs",
    solver: str = "gd",
    tolerance: float = 1e-8,
) -> Explanation:
    """Explain `model` on `images` at the breakpoint `layer` with L2-CAF.

    Every (image, target) pair is its own problem with its own filter, schedule and stopping rule, all
    solved in one batch; the result equals solving them one by one with the reference loop.  The model
    is handed back unchanged.  `fused=False` runs the generic path even where the head could be fused;
    `history=True` keeps the maps at every check (every `check_every` iterations), for pictures of
    the convergence.  `map` picks how the filter becomes a map (normalize_filter).  `solver="exact"`
    goes past where the reference loop stops: the minimizer in closed form for fused heads with the
    l2norm constraint (class-specific, or class-oblivious without a ReLU), otherwise a descent from
    the loop's answer until the projected gradient is below `tolerance`, no step lowers the loss any
    more, or 10 * max_iter steps were tried (caffast.exact); `gradient_norm` says where it ended.
    """
    check_choice("mode", mode, MODES)
    check_choice("constraint", constraint, CONSTRAINTS)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    check_choice("init", init, INITS)
    check_choice("map", map, MAPS)
    check_choice("solver", solver, SOLVERS)
    if objective is not None and mode != "oblivious":
        raise ValueError("objective replaces the class-oblivious loss: use it with mode='oblivious'")
    _check_settings(max_iter, lr, min_error, check_every, tolerance)
    images = _check_images(images)
    device = _model_device(model)
    backend = resolve_backend(backend, device)

    with frozen(model):
        images = images.to(device)
        capture, tail = split(model, layer, images)
        targets = _resolve_targets(mode, targets, capture.output)
        batch, per_image = targets.shape
        image_index = torch.arange(batch, device=device).repeat_interleave(per_image)
        features = capture.features
        grid = (features.shape[2], features.shape[3])
        dtype = features.dtype if features.dtype in (torch.float32, torch.float64) else torch.float32

        settings = LoopSettings(max_iter, lr, min_error, check_every, optimizer, record=history)
        reference = capture.output.to(dtype).index_select(0, image_index)
        signs = class_signs(targets.flatten(), reference.shape[1], dtype) if mode == "specific" else None
        head = detect_head(tail, grid) if fused and objective is None else None
        initial = initial_parameters(constraint, init, image_index.numel(), grid, seed, dtype, device)
        fused_head = None if head is None else precompute(head, features, image_index, mode, signs)
        if fused_head is not None:
            problem = FusedProblem(fused_head, constraint)
        else:
            loss = Objective(mode=mode, reference=reference, signs=signs, custom=objective)
            # the compiled filters take float32/64 features; half-precision ones get the torch multiply
            multiply = filter_multiply(backend, constraint) if features.dtype == dtype else None
            problem = AutogradProblem(tail, features, image_index, loss, constraint, grid, multiply)

        solution = _optimize(solver, problem, fused_head, backend, constraint, initial, settings, tolerance)
        kinked = fused_head is not None and fused_head.parts == 2 and constraint == "l2norm"
        mirrored = FusedProblem(fused_head, constraint, zeros_negative=True) if kinked else None
        final_objective, gradient_norm = stationarity(problem, solution.params, constraint, mirrored)
        if solver == "exact":
            solution.loss = final_objective
            if settings.record:  # the answer is the last frame
                solution.history.append((int(solution.iterations.max()), solution.params.clone()))

    params = solution.params.to(dtype)
    filters = constrained_filter(params, "gauss", grid) if constraint == "gauss" else params
    shape = (batch, per_image)

    def final_maps(values: torch.Tensor) -> torch.Tensor:
        return normalize_filter(values.to(dtype), constraint, shape=grid, map=map).reshape(*shape, *grid)

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
        mode=mode,
        constraint=constraint,
        map=map,
        solver=solver,
        tail=tail.kind,
        path="generic" if head is None else "fused",
        backend=backend,
        history=[(step, final_maps(values)) for step, values in solution.history],
    )
