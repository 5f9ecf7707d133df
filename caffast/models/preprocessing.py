"""How an image becomes a model's input: the size, crop, resize filter and normalization a model
was trained with.  caffast.apps.imagefiles applies it to image files."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..eval import scenes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How an image file becomes a model input.

    crop: the shorter side is resized to floor(size / crop_pct) as timm does (the reference's 256 for
    224; other sizes may differ by a pixel from round(size * 256 / 224)), then a centre crop of size x
    size is taken; otherwise the whole picture is resized to size x size.  Then each channel becomes
    (x - mean) / std.  timm's models bring their own crop_pct, interpolation, mean and std.
    """

    size: int
    crop: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 224 / 256
    interpolation: str = "bilinear"  # a torchvision InterpolationMode value: "bilinear", "bicubic", ...

    def record(self) -> dict[str, Any]:
        """The settings as a run's config.json holds them.  crop_pct and interpolation came later and
        are written only where they differ from their defaults, so that folders made before them
        (with the same, default, preprocessing) still resume."""
        settings = asdict(self)
        for later in ("crop_pct", "interpolation"):
            if settings[later] == getattr(Preprocessing, later):
                del settings[later]
        return settings


IMAGENET = Preprocessing(224, crop=True, mean=IMAGENET_MEAN, std=IMAGENET_STD)
# the shipped demo model's input: a 64 x 64 scene normalized as caffast.eval.scenes.normalize does
DEMO = Preprocessing(64, crop=False, mean=(scenes.MEAN,) * 3, std=(scenes.STD,) * 3)
