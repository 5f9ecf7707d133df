"""How an image becomes a model's input: the size, crop, resize filter and normalization a model
was trained with.  caffast.apps.imagefiles applies it to image files."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

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

    Clips (models that take (N, C, D, H, W), torchvision's video models): `frames` frames are
    sampled evenly from the clip, each resized to `resize` as torchvision's video transforms do
    (two numbers: that height and width; one: the shorter side), then centre-cropped to size x size
    and normalized.  `volume` says how a .npy volume is scaled ("zscore", "minmax" or "none"):
    volumes are neither resized nor normalized by mean and std, their scale is not a photo's.
    The three are None for models that take images.
    """

    size: int
    crop: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 224 / 256
    interpolation: str = "bilinear"  # a torchvision InterpolationMode value: "bilinear", "bicubic", ...
    resize: Optional[tuple[int, ...]] = None  # clips: the frames' resize before the crop, (H, W) or (shorter side,)
    frames: Optional[int] = None  # clips: how many frames are sampled, evenly, from first to last
    volume: Optional[str] = None  # .npy volumes: "zscore", "minmax" or "none" (VOLUME_SCALINGS)

    @property
    def takes_clips(self) -> bool:
        """Whether the model's input is a clip or a volume (N, C, D, H, W) rather than an image."""
        return self.frames is not None

    def record(self) -> dict[str, Any]:
        """The settings as a run's config.json holds them.  Fields that came later are written only
        where they differ from their defaults, so that folders made before them (with the same,
        default, preprocessing) still resume."""
        settings = asdict(self)
        for later in ("crop_pct", "interpolation", "resize", "frames", "volume"):
            if settings[later] == getattr(Preprocessing, later):
                del settings[later]
        return settings


VOLUME_SCALINGS = ("zscore", "minmax", "none")
CLIP_FRAMES = 16  # the clip length torchvision's video models were trained on (r3d_18, mc3_18, r2plus1d_18, mvit)

IMAGENET = Preprocessing(224, crop=True, mean=IMAGENET_MEAN, std=IMAGENET_STD)
# the shipped demo model's input: a 64 x 64 scene normalized as caffast.eval.scenes.normalize does
DEMO = Preprocessing(64, crop=False, mean=(scenes.MEAN,) * 3, std=(scenes.STD,) * 3)


def video_preprocessing(transform: Any, frames: int = CLIP_FRAMES, volume: str = "zscore") -> Preprocessing:
    """The Preprocessing of a torchvision video model's evaluation transform (its weights'
    `transforms()`, a VideoClassification): its crop, resize, filter, mean and std."""
    height, width = transform.crop_size
    if height != width:
        raise ValueError(f"caffast prepares square crops; this transform crops {height} x {width}")
    return Preprocessing(height, crop=True, mean=tuple(transform.mean), std=tuple(transform.std),
                         interpolation=transform.interpolation.value, resize=tuple(transform.resize_size),
                         frames=frames, volume=volume)  # fmt: skip
