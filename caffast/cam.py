"""A CAM-style front end with pytorch-grad-cam's interface, so that its users switch with one import:

    from caffast.cam import L2CAF as GradCAM

    with GradCAM(model=model, target_layers=[model.layer4[-1]]) as cam:
        grayscale = cam(input_tensor=x, targets=[ClassifierOutputTarget(281)], aug_smooth=False, eigen_smooth=False)

returns float32 numpy maps (N, H, W) in [0, 1] at the input's size, averaged over the target layers
((N, D, H, W) for clips and volumes (N, C, D, H, W), resized trilinearly).
`GradCAM` here is the baseline with the same interface.  Neither leaves a hook on the model.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from .core.choices import Mode
from .core.layouts import ReshapeTransform
from .engine.embedded import settings_and_others
from .engine.explain import explain, upsample_maps
from .engine.inputs import check_images
from .eval.gradcam import grad_cam

TargetLayers = Union[str, nn.Module, Sequence[Union[str, nn.Module]]]

# pytorch-grad-cam's default test-time augmentation: horizontal flips times these factors
_FLIPS = (False, True)
_FACTORS = (0.9, 1.0, 1.1)


def _layers(target_layers: TargetLayers) -> list[Union[str, nn.Module]]:
    """A name, a module, or a list of names and modules (a string is one name, not its letters)."""
    layers = [target_layers] if isinstance(target_layers, (str, nn.Module)) else list(target_layers)
    if not layers:
        raise ValueError("target_layers is empty; pass the layers to explain, e.g. [model.layer4] or 'layer4'")
    for layer in layers:
        if not isinstance(layer, (str, nn.Module)):
            raise TypeError(f"target_layers holds a {type(layer).__name__}; pass module names or modules")
    return layers


def first_component(weighted: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's eigen smoothing: per image, the (N, C, H, W) activations projected on their
    first principal component over positions (no sign correction), as (N, H, W)."""
    values = np.nan_to_num(weighted.detach().cpu().double().numpy())
    projections = []
    for image in values:
        cells = image.reshape(image.shape[0], -1).T
        cells = cells - cells.mean(axis=0)
        _, _, vt = np.linalg.svd(cells, full_matrices=True)
        projections.append((cells @ vt[0, :]).reshape(image.shape[1:]))
    return torch.from_numpy(np.float32(projections)).to(weighted.device)


def _move(model: nn.Module, device: Union[str, torch.device], asked: str) -> None:
    """pytorch-grad-cam's use_cuda and device: the model moved there, or an error that says why not
    (before anything moved)."""
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{asked}: {error}; pass a device such as 'cpu', 'cuda' or 'cuda:1'") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{asked} needs a CUDA GPU and this machine has none that torch can use; leave it out "
                         "to run where the model is")  # fmt: skip
    try:
        model.to(target)
    except (RuntimeError, AssertionError) as error:
        raise ValueError(f"{asked}: the model cannot be moved there ({error})") from None


def _test_time_transforms(transforms: Any) -> list[Any]:
    """ttach's transforms (a Compose, or any iterable of objects with augment_image and
    deaugment_mask), checked when the CAM is made rather than halfway through a call."""
    try:
        listed = list(transforms)
    except TypeError:
        listed = None
    wanted = ("augment_image", "deaugment_mask")
    if not listed or not all(callable(getattr(t, name, None)) for t in listed for name in wanted):
        raise TypeError(
            "tta_transforms must be a ttach Compose (e.g. ttach.aliases.flip_transform()) or a non-empty list of "
            f"transforms with augment_image and deaugment_mask; got {type(transforms).__name__}"
            + (f" of {sorted({type(t).__name__ for t in listed})}" if listed else "")
        )
    return listed


def _per_image(targets: Any, batch: int) -> list[list[Any]]:
    """pytorch-grad-cam's targets, one per image, as explain's per-image lists."""
    listed = isinstance(targets, (Sequence, torch.Tensor, np.ndarray)) and not isinstance(targets, str)
    if not listed or getattr(targets, "ndim", 1) == 0:
        raise TypeError(
            f"targets must be a list with one target per image, such as [ClassifierOutputTarget(281)] * {batch}, "
            f"or None for each image's top class; got a {type(targets).__name__}"
        )
    if len(targets) != batch:
        raise ValueError(f"{len(targets)} targets for {batch} images; pass one per image")
    return [[target] for target in targets]


class _CAM:
    """Shared by the methods: the constructor and call of pytorch-grad-cam, the context manager, test-time
    augmentation, and maps averaged over target layers.

    `compute_input_gradient`, `uses_gradients` and `detach` are accepted and change nothing (no method
    here needs the input's gradient); `use_cuda=True` or `device` move the model there, as
    pytorch-grad-cam's `use_cuda` did before 1.5 (it now runs where the model is).
    """

    def __init__(
        self,
        model: nn.Module,
        target_layers: TargetLayers,
        reshape_transform: Optional[ReshapeTransform] = None,
        compute_input_gradient: bool = False,
        uses_gradients: bool = True,
        tta_transforms: Optional[Iterable[Any]] = None,
        detach: bool = True,
        *,
        use_cuda: bool = False,
        device: Union[None, str, torch.device] = None,
    ):
        if isinstance(reshape_transform, bool):  # pytorch-grad-cam < 1.5: (model, target_layers, use_cuda, ...)
            use_cuda, reshape_transform = reshape_transform, None
        if reshape_transform is not None and not callable(reshape_transform):
            raise TypeError(f"reshape_transform must be a function of the layer's output, not {type(reshape_transform).__name__}")
        if use_cuda or device is not None:
            _move(model, "cuda" if device is None else device, "use_cuda=True" if device is None else f"device={device!r}")
        self.model = model
        self.target_layers = _layers(target_layers)
        self.reshape_transform = reshape_transform
        self.compute_input_gradient = compute_input_gradient
        self.uses_gradients = uses_gradients
        self.tta_transforms = None if tta_transforms is None else _test_time_transforms(tta_transforms)
        self.detach = detach
        self.batch_size = 32  # read by pytorch-grad-cam's perturbation methods; set freely
        self.outputs: Any = None

    def __enter__(self) -> "_CAM":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        """No hook outlives a call; kept for pytorch-grad-cam's interface."""

    def __call__(
        self,
        input_tensor: torch.Tensor,
        targets: Optional[Sequence[Any]] = None,
        aug_smooth: bool = False,
        eigen_smooth: bool = False,
    ) -> np.ndarray:
        """(N, H, W) float32 maps in [0, 1] ((N, D, H, W) for clips and volumes); `targets` one per image
        (ints, ClassifierOutputTarget or any
        callable of one image's output), None for each image's top class.  `aug_smooth` averages the maps
        of horizontally flipped and rescaled (x 0.9, 1, 1.1) inputs (or of `tta_transforms`);
        `eigen_smooth` maps the first principal component of the filtered activations."""
        images = check_images(input_tensor)
        rows = None
        if targets is not None:
            rows = _per_image(targets, images.shape[0])
        if not aug_smooth:
            return self._maps(images, rows, eigen_smooth)
        return np.mean(np.float32([cam for cam in self._augmented(images, rows, eigen_smooth)]), axis=0)

    def _augmented(self, images: torch.Tensor, rows: Optional[list], eigen_smooth: bool) -> Iterable[np.ndarray]:
        if self.tta_transforms is not None:  # a ttach Compose
            for transform in self.tta_transforms:
                maps = self._maps(transform.augment_image(images), rows, eigen_smooth)
                yield transform.deaugment_mask(torch.from_numpy(maps)[:, None])[:, 0].numpy()
            return
        for flip in _FLIPS:
            for factor in _FACTORS:
                augmented = images.flip(-1) if flip else images
                maps = self._maps(augmented * factor if factor != 1.0 else augmented, rows, eigen_smooth)
                yield maps[..., ::-1] if flip else maps

    def _maps(self, images: torch.Tensor, rows: Optional[list], eigen_smooth: bool) -> np.ndarray:
        size = tuple(images.shape[2:])
        per_layer = [upsample_maps(self.maps(images, layer, rows, eigen_smooth), size)[:, 0] for layer in self.target_layers]
        mean = torch.stack(per_layer).mean(dim=0)
        return upsample_maps(mean[:, None], size)[:, 0].detach().float().cpu().numpy()

    def maps(self, images: torch.Tensor, layer: Union[str, nn.Module], rows: Optional[list], eigen_smooth: bool) -> torch.Tensor:
        """(N, 1, h, w) maps at the layer's resolution ((N, 1, d, h, w) for clips and volumes)."""
        raise NotImplementedError


class L2CAF(_CAM):
    """L2-CAF maps with pytorch-grad-cam's interface; `mode` and `explain_options` are caffast.explain's
    keywords (max_iter, lr, solver, map, layout, ...), its settings checked here into `settings`.

    The default is class-specific for the given targets (the top-1 class when None), as a
    class-discriminative CAM method would be.  A class target (an int, or ClassifierOutputTarget(c))
    raises class c's logit, as it scores for pytorch-grad-cam (`loss="logit"`; pass another `loss`
    among explain_options to change it).  With `eigen_smooth` the map is the first principal
    component of A * f, the activations times the converged filter.
    """

    def __init__(self, model: nn.Module, target_layers: TargetLayers, reshape_transform: Optional[ReshapeTransform] = None,
                 *args: Any, mode: Mode = "specific", **explain_options: Any):  # fmt: skip
        accepted = ("compute_input_gradient", "uses_gradients", "tta_transforms", "detach", "use_cuda", "device")
        base = {key: explain_options.pop(key) for key in accepted if key in explain_options}
        self.settings, self.explain_options = settings_and_others(explain_options, mode=mode, loss="logit")
        super().__init__(model, target_layers, reshape_transform, *args, **base)

    def maps(self, images: torch.Tensor, layer: Union[str, nn.Module], rows: Optional[list], eigen_smooth: bool) -> torch.Tensor:
        targets = rows if self.settings.mode == "specific" else None
        result = explain(self.model, images, layer, targets, settings=self.settings,
                         reshape_transform=self.reshape_transform, **self.explain_options)  # fmt: skip
        self.outputs = result.output
        if not eigen_smooth:
            return result.maps
        weighted = result.features.to(result.filters.dtype) * result.filters[:, :1]
        return first_component(weighted).clamp_min(0)[:, None]


class GradCAM(_CAM):
    """Grad-CAM maps, the baseline, with the same interface (class targets; no eigen smoothing)."""

    def maps(self, images: torch.Tensor, layer: Union[str, nn.Module], rows: Optional[list], eigen_smooth: bool) -> torch.Tensor:
        if eigen_smooth or self.reshape_transform is not None:
            raise ValueError("the Grad-CAM baseline has no eigen_smooth or reshape_transform; use L2CAF or pytorch-grad-cam")
        result = grad_cam(self.model, images, layer, rows)
        self.outputs = result.output
        return result.maps
