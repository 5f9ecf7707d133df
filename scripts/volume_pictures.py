"""The volume picture of docs/api.md: L2-CAF on a small 3-D CNN, drawn over axial slices.

A VolumeNet (caffast.eval.volumes) learns whether a noisy 16 x 16 x 16 volume holds a bright ball
(a few hundred Adam steps on the CPU, seed 0).  On held-out volumes with a ball, explain's
class-specific map at block1 (an 8 x 8 x 8 grid, the generic path with its folded Conv3d and
BatchNorm3d) is scored by the pointing game (is the peak of the map, resized to the volume, inside
the ball?), and one of them is drawn as a montage of its axial slices: the slices alone above, the
map over them below.

    python scripts/volume_pictures.py [--out docs/volume_montage.png]
"""

from __future__ import annotations

import argparse

import torch
from PIL import Image

import caffast
from caffast import viz
from caffast.eval.volumes import VolumeNet, ball_volumes

SIZE, STEPS, BATCH = 16, 300, 32
ZOOM = 8  # pixels per voxel in the picture


def train(generator: torch.Generator) -> VolumeNet:
    model = VolumeNet(channels=8, classes=2)
    data = ball_volumes(1024, SIZE, generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(STEPS):
        pick = torch.randint(len(data.labels), (BATCH,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(data.volumes[pick]), data.labels[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/volume_montage.png")
    args = parser.parse_args()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = train(generator)
    held_out = ball_volumes(64, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        accuracy = (model(held_out.volumes).argmax(1) == held_out.labels).float().mean().item()
    balls = held_out.labels == 1
    volumes, masks = held_out.volumes[balls], held_out.masks[balls]
    exp = caffast.explain(model, volumes, "block1", mode="specific", targets=1, map="positive")
    heat = exp.upsample(SIZE)[:, 0]  # (N, 16, 16, 16)
    peaks = heat.flatten(1).argmax(1)
    hits = masks.flatten(1)[torch.arange(len(peaks)), peaks].float().mean().item()
    print(f"held-out accuracy {accuracy:.2f}; pointing game at block1 ({tuple(exp.maps.shape[2:])} grid): "
          f"{hits:.2f} of {len(peaks)} volumes with a ball")  # fmt: skip
    shown = volumes[0, 0]
    grey = (shown - shown.min()) / (shown.max() - shown.min())
    centre = int(held_out.centres[balls][0, 0].round())
    slices = list(range(max(0, centre - 5), min(SIZE, centre + 6), 2))
    # the slices alone (alpha 0) above the slices with the map, each voxel drawn as ZOOM x ZOOM pixels
    rows = [viz.montage(grey, exp.maps[0, 0], axis="axial", slices=slices, columns=len(slices), alpha=alpha)
            for alpha in (0.0, 0.6)]  # fmt: skip
    sheet = Image.new("RGB", (rows[0].width, 2 * rows[0].height))
    sheet.paste(rows[0], (0, 0))
    sheet.paste(rows[1], (0, rows[0].height))
    sheet.resize((sheet.width * ZOOM, sheet.height * ZOOM), Image.Resampling.NEAREST).save(args.out)
    print(f"wrote {args.out}: axial slices {slices} of a held-out volume, its ball centred on slice {centre}")


if __name__ == "__main__":
    main()
