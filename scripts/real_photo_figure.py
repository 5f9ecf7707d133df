"""The real-photo picture of README.md (docs/real_photo.png), from the real tier: class-specific
maps of the ImageNet-trained EfficientNet-Lite0 at bn2 with caffast's default loss, Grad-CAM and the
releases' loss (caffast.eval.real_demo, which `caffast demo --real` runs too).

    python scripts/real_photo_figure.py [--out docs]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from caffast.eval.real_demo import write_real_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs")
    args = parser.parse_args()
    path, rates = write_real_demo(Path(args.out))
    shutil.move(path, Path(args.out) / "real_photo.png")
    print(f"wrote {Path(args.out) / 'real_photo.png'}")
    for method, rate in rates.items():
        print(f"  pointing game over the real tier, {method}: {rate:.2f}")


if __name__ == "__main__":
    main()
