"""Procedural scenes with known ground truth, so attention maps can be scored without a data set.

Every scene is drawn from one seed: a mildly textured background and one or two flat-coloured
shapes whose exact pixel masks are returned with the picture.  Colour, size, position and rotation
are random and independent of the class, so only the shape tells the classes apart.  Two-object
scenes hold two different classes that never touch, which makes class-specific maps checkable.

Seeds below HELDOUT_START are the training range; seeds from HELDOUT_START up are never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw

CLASS_NAMES = ("circle", "square", "triangle", "cross", "ring", "star")
NUM_CLASSES = len(CLASS_NAMES)
HELDOUT_START = 1_000_000

# Input normalization of the demo model: centred, unit-ish spread (scene pixels lie in [0, 1]).
MEAN = 0.5
STD = 0.25

_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered, so small shapes keep their outline
_RADIUS = (0.12, 0.22)  # object radius as a fraction of the image side
_GAP = 2.0  # pixels between the bounding circles of two objects
_CONTRAST = 0.35  # least L-inf distance between an object's colour and the mean background colour
_NOISE = 0.03  # pixel noise sigma (clipped at 2.5 sigma)
_CROSS_ARM = 0.3  # half-width of a cross's arms, of its radius
_STAR_INNER = 0.42  # radius of a star's inner corners, of its radius
_RING_HOLE = 0.55  # radius of a ring's hole, of its radius

ImageLike = Union[np.ndarray, torch.Tensor]


@dataclass
class Scene:
    """One rendered scene: image (3, S, S) float32 in [0, 1], labels, masks (objects, S, S) bool, colours."""

    image: np.ndarray
    labels: list[int]
    masks: np.ndarray
    colours: list[tuple[float, float, float]]


def _polygon(label: int, rng: np.random.Generator) -> Optional[np.ndarray]:
    """Unit-radius vertices (n, 2) of a polygonal class turned by a random angle; None for round ones."""
    if label == 1:  # square
        angles = np.arange(4) * np.pi / 2 + np.pi / 4
        points = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    elif label == 2:  # triangle
        angles = np.arange(3) * 2 * np.pi / 3 - np.pi / 2
        points = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    elif label == 3:  # cross: a plus sign whose arms reach _CROSS_ARM on either side of its axis
        a = _CROSS_ARM
        points = np.array(
            [(a, 1), (a, a), (1, a), (1, -a), (a, -a), (a, -1)]
            + [(-a, -1), (-a, -a), (-1, -a), (-1, a), (-a, a), (-a, 1)],
            dtype=np.float64,
        )
    elif label == 5:  # five-pointed star
        angles = np.arange(10) * np.pi / 5 - np.pi / 2
        radii = np.where(np.arange(10) % 2 == 0, 1.0, _STAR_INNER)
        points = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    else:  # circle, ring
        return None
    theta = rng.uniform(0, 2 * np.pi)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return points @ rotation.T


def _shape_mask(label: int, centre: np.ndarray, radius: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """The (size, size) bool mask of one shape: drawn supersampled, kept where it covers half a pixel."""
    scale = _SUPERSAMPLE
    canvas = Image.new("L", (size * scale, size * scale), 0)
    draw = ImageDraw.Draw(canvas)
    # Pixel (i, j) covers [j, j+1) x [i, i+1) in image coordinates, so centres lie at half-integers.
    cx, cy = centre * scale
    r = radius * scale
    points = _polygon(label, rng)
    if points is not None:
        draw.polygon([(cx + x * r, cy + y * r) for x, y in points], fill=255)
    else:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if label == 4:  # ring: punch the hole
            hole = _RING_HOLE * r
            draw.ellipse([cx - hole, cy - hole, cx + hole, cy + hole], fill=0)
    small = canvas.resize((size, size), Image.BOX)
    return np.asarray(small) >= 128


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float64: a tinted grey, a smooth low-frequency blotch pattern and fine noise."""
    base = rng.uniform(0.3, 0.7) + rng.uniform(-0.05, 0.05, size=3)
    coarse = rng.uniform(-0.08, 0.08, size=(4, 4, 3))
    channels = [Image.fromarray(coarse[..., c].astype(np.float32), "F") for c in range(3)]
    blotches = np.stack([np.asarray(c.resize((size, size), Image.BICUBIC)) for c in channels], axis=-1)
    noise = np.clip(rng.normal(0.0, _NOISE, size=(size, size, 3)), -2.5 * _NOISE, 2.5 * _NOISE)
    return base + np.clip(blotches, -0.08, 0.08) + noise


def _colour(rng: np.random.Generator, background_mean: np.ndarray) -> np.ndarray:
    """A random RGB colour far enough from the background to be seen (rejection sampling)."""
    while True:
        colour = rng.uniform(0.0, 1.0, size=3)
        if np.abs(colour - background_mean).max() >= _CONTRAST:
            return colour


def _placements(rng: np.random.Generator, size: int, count: int) -> list[tuple[np.ndarray, float]]:
    """Centres and radii of `count` objects inside the image whose bounding circles keep a gap."""
    while True:
        placed: list[tuple[np.ndarray, float]] = []
        for _ in range(count):
            radius = rng.uniform(*_RADIUS) * size
            centre = rng.uniform(radius + 1, size - 1 - radius, size=2)
            placed.append((centre, radius))
        if all(
            np.linalg.norm(a[0] - b[0]) >= a[1] + b[1] + _GAP for i, a in enumerate(placed) for b in placed[i + 1 :]
        ):
            return placed


def make_scene(seed: int, size: int = 64, objects: int = 1) -> Scene:
    """The scene of a seed: the same seed, size and object count always give the same pixels.

    The random stream is keyed by (seed, objects, size): one- and two-object scenes of a seed are unrelated.
    """
    if objects not in (1, 2):
        raise ValueError(f"objects must be 1 or 2, not {objects!r}")
    rng = np.random.default_rng([seed, objects, size])
    labels = [int(c) for c in rng.choice(NUM_CLASSES, size=objects, replace=False)]
    picture = _background(rng, size)
    background_mean = picture.reshape(-1, 3).mean(axis=0)
    masks, colours = [], []
    for label, (centre, radius) in zip(labels, _placements(rng, size, objects)):
        mask = _shape_mask(label, centre, radius, size, rng)
        colour = _colour(rng, background_mean)
        picture[mask] = colour
        masks.append(mask)
        colours.append(tuple(float(v) for v in colour.astype(np.float32)))
    image = np.clip(picture, 0.0, 1.0).astype(np.float32).transpose(2, 0, 1)
    return Scene(image=np.ascontiguousarray(image), labels=labels, masks=np.stack(masks), colours=colours)


def normalize(image: ImageLike) -> torch.Tensor:
    """The demo model's input from scene pixels in [0, 1]: (3, H, W) or (N, 3, H, W), float32."""
    tensor = torch.as_tensor(image, dtype=torch.float32)
    return (tensor - MEAN) / STD


def target_distribution(labels: Sequence[int]) -> torch.Tensor:
    """The training target of a scene: probability 1/k on each of its k classes (one-hot for one object)."""
    target = torch.zeros(NUM_CLASSES)
    target[list(labels)] = 1.0 / len(labels)
    return target


class SceneDataset(torch.utils.data.Dataset):
    """Scenes of the given seeds as (normalized image, target distribution) pairs, rendered on access."""

    def __init__(self, seeds: Sequence[int], objects: int = 1, size: int = 64) -> None:
        self.seeds = list(seeds)
        self.objects = objects
        self.size = size

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        scene = make_scene(self.seeds[index], self.size, self.objects)
        return normalize(scene.image), target_distribution(scene.labels)
