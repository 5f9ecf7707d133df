"""The CAM localization protocol on the real tier: L2-CAF against Grad-CAM with the ImageNet-trained
EfficientNet-Lite0 on the shipped photos and pair scenes (caffast.eval.real), through the commands.

    python benchmarks/real_localization.py [--out real-localization] [--report]

Writes the tier's 11 pictures as image files with a CSV of their boxes, and the network's weights as
a state-dict file with timm's names (the package ships them with EfficientNet-PyTorch's), then runs

    caffast run OUT/pictures --out OUT/run --arch tf_efficientnet_lite0 --weights OUT/lite0.pth \\
        --annotations OUT/boxes.csv --baseline gradcam

which prints the table (one map per picture, for the network's top-1 class, at the default layer
bn2) and writes OUT/run/summary.json; --report also writes OUT/run/report.html.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from caffast.apps.cli import main as caffast
from caffast.eval.real import efficientnet_lite0, real_tier


def write_inputs(out: Path) -> list[str]:
    """The pictures, boxes.csv and lite0.pth under `out`; returns the `caffast run` arguments."""
    pictures = out / "pictures"
    pictures.mkdir(parents=True, exist_ok=True)
    lines = ["image,class,x0,y0,x1,y1"]
    for photo in real_tier():
        name = f"{photo.name}.png"
        photo.image.save(pictures / name)
        lines += [f"{name},{obj.class_index},{','.join(f'{v:g}' for v in obj.box)}" for obj in photo.objects]
    (out / "boxes.csv").write_text("\n".join(lines) + "\n")
    torch.save(efficientnet_lite0().state_dict(), out / "lite0.pth")
    return ["run", str(pictures), "--out", str(out / "run"), "--arch", "tf_efficientnet_lite0", "--weights",
            str(out / "lite0.pth"), "--annotations", str(out / "boxes.csv"), "--baseline", "gradcam"]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="real-localization", help="folder for the inputs and the run")
    parser.add_argument("--report", action="store_true", help="also write the run's report.html")
    args = parser.parse_args()
    run = write_inputs(Path(args.out))
    print("caffast " + " ".join(run), flush=True)
    code = caffast(run)
    if code == 0 and args.report:
        code = caffast(["report", str(Path(args.out) / "run")])
    return code


if __name__ == "__main__":
    sys.exit(main())
