"""Throughput of a whole `caffast run` over a folder of images against a pytorch-grad-cam GradCAM loop
over the same folder and model, side by side in one run (CPU).

    pytest benchmarks/test_throughput.py --benchmark-group-by=group --benchmark-json=throughput.json

Each round is the whole job on 32 images, from nothing to a map file per image: the model is built
(random torchvision resnet18 weights from seed 0, or the shipped demo model), every image is read and
preprocessed, explained class-specifically for its top-1 class, and its map saved.  `caffast run` does
it as the command does (into a fresh output folder: results, records, index; the fused path at these
layers), at batch 32 and 1; the GradCAM loop is what one writes with pytorch-grad-cam: PIL, torchvision's
transforms, GradCAM image by image, np.save.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image

from caffast import explain
from caffast.apps.cli import main
from caffast.eval.demo_model import load_demo_model
from caffast.eval.scenes import make_scene
from caffast.models.preprocessing import DEMO, IMAGENET
from caffast.models.source import RANDOM_WEIGHTS_SEED

pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")

IMAGES = 32
ROUNDS = dict(rounds=3, iterations=1, warmup_rounds=1)
MODELS = {  # the command's --arch and --weights, the layer, and the model and transform a GradCAM script builds
    "resnet18": dict(flags=["--arch", "resnet18", "--weights", "random"], layer="layer4"),
    "demo": dict(flags=["--arch", "demo"], layer="features"),
}


def _build(arch: str) -> torch.nn.Module:
    if arch == "demo":
        return load_demo_model()
    torch.manual_seed(RANDOM_WEIGHTS_SEED)  # the model `--weights random` names
    return torchvision.models.resnet18().eval()


def _transform(arch: str) -> T.Compose:
    if arch == "demo":
        return T.Compose([T.Resize((DEMO.size, DEMO.size)), T.ToTensor(), T.Normalize(DEMO.mean, DEMO.std)])
    return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET.mean, IMAGENET.std)])


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """32 images per model: smooth random 256 x 256 JPEGs for resnet18, 64 x 64 scene PNGs for the demo."""
    folders = {}
    photos = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for k in range(IMAGES):
        coarse = rng.integers(0, 255, size=(16, 16, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((256, 256), Image.BICUBIC).save(photos / f"{k:03d}.jpg", quality=90)
    folders["resnet18"] = photos
    scenes = tmp_path_factory.mktemp("scenes")
    for k in range(IMAGES):
        pixels = (make_scene(k).image.transpose(1, 2, 0) * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(scenes / f"{k:03d}.png")
    folders["demo"] = scenes
    return folders


def _fresh_folder(tmp_path: Path):
    """pedantic's setup: a new output folder for every round, so that every round explains everything."""
    count = iter(range(1_000_000))

    def setup():
        return (tmp_path / f"out{next(count)}",), {}

    return setup


def _rate(benchmark) -> None:
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["images_per_second"] = IMAGES / benchmark.stats.stats.mean


@pytest.mark.parametrize("arch", MODELS)
class TestThroughput:
    @pytest.mark.parametrize("batch", [32, 1])
    def test_caffast_run(self, benchmark, folders, tmp_path, arch, batch):
        benchmark.group = f"run-{arch}-{IMAGES}-images"
        benchmark.name = f"caffast run batch {batch}"
        side = DEMO.size if arch == "demo" else IMAGENET.size
        noise = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
        probe = explain(_build(arch), noise, MODELS[arch]["layer"], mode="specific", max_iter=1)
        assert probe.path == "fused"

        def run(out: Path) -> None:
            argv = ["run", str(folders[arch]), "--out", str(out), *MODELS[arch]["flags"], "--mode", "specific",
                    "--batch-size", str(batch), "--quiet"]  # fmt: skip
            assert main(argv) == 0

        benchmark.pedantic(run, setup=_fresh_folder(tmp_path), **ROUNDS)
        _rate(benchmark)

    def test_grad_cam_loop(self, benchmark, folders, tmp_path, arch):
        benchmark.group = f"run-{arch}-{IMAGES}-images"
        benchmark.name = "pytorch-grad-cam GradCAM loop"

        def loop(out: Path) -> None:
            out.mkdir()
            model, transform = _build(arch), _transform(arch)
            with pytorch_grad_cam.GradCAM(model=model, target_layers=[model.get_submodule(MODELS[arch]["layer"])]) as cam:
                for path in sorted(folders[arch].iterdir()):
                    image = transform(Image.open(path).convert("RGB"))[None]
                    heat = cam(input_tensor=image, targets=None)[0]  # the top-1 class
                    np.save(out / f"{path.name}.npy", heat)

        benchmark.pedantic(loop, setup=_fresh_folder(tmp_path), **ROUNDS)
        _rate(benchmark)
