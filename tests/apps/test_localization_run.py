"""`caffast run --annotations`: every map scored by the CAM protocol as caffast.eval.protocol scores
the saved maps, Grad-CAM beside L2-CAF, a summary a resumed run reproduces, and the settings guarded
like the run's others."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.transforms import functional as TF

from caffast.apps import runner
from caffast.apps.cli import main
from caffast.apps.imagefiles import upright_size
from caffast.eval.annotations import load_annotations
from caffast.eval.demo_model import load_demo_model
from caffast.eval.geometry import resize_geometry
from caffast.eval.gradcam import grad_cam
from caffast.eval.protocol import evaluate_image
from caffast.eval.scenes import MEAN, STD, make_scene
from caffast.eval.summary import summarize

SCENES = 6
SETTINGS = ["--arch", "demo", "--max-iter", "50"]


def _boxes_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, columns = np.nonzero(mask)
    return columns.min(), rows.min(), columns.max() + 1, rows.max() + 1


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """Two-object scenes of 80 x 96 pixels (resized to the demo's 64 x 64, so boxes must follow the
    resize), a CSV of their boxes with a label mask per scene, and one image the CSV leaves out."""
    root = tmp_path_factory.mktemp("localization")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    lines = ["image,class,x0,y0,x1,y1,mask"]
    for seed in range(SCENES):
        scene = make_scene(seed, size=96, objects=2)
        picture = (scene.image.transpose(1, 2, 0) * 255).round().astype(np.uint8)[8:88]  # 96 wide, 80 high
        name = f"sub/{seed}.png" if seed % 2 else f"{seed}.png"
        Image.fromarray(picture).save(images / name)
        labels = np.zeros(picture.shape[:2], dtype=np.uint8)
        for label, mask in zip(scene.labels, scene.masks):
            labels[mask[8:88]] = label + 1  # the CSV's mask value of class c is c + 1
            x0, y0, x1, y1 = _boxes_of(mask[8:88])
            lines.append(f"{name},{label},{x0},{y0},{x1},{y1},masks/{seed}.png")
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(labels).save(root / "masks" / f"{seed}.png")
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(images / "unannotated.png")
    csv = root / "boxes.csv"
    csv.write_text("\n".join(lines) + "\n")
    return images, csv


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    images, csv = data
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(["run", str(images), "--out", str(out), *SETTINGS, "--annotations", str(csv), "--baseline", "gradcam"]) == 0
    return out


def _index(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]


def _model_input(path: Path) -> torch.Tensor:
    """The demo's input, made here with torchvision: a plain 64 x 64 bilinear resize, normalized."""
    with Image.open(path) as image:
        resized = TF.resize(image.convert("RGB"), [64, 64], TF.InterpolationMode.BILINEAR)
    return (TF.to_tensor(resized) - MEAN) / STD


def test_records_equal_the_protocol_on_the_saved_maps(data, run):
    images, csv = data
    annotations = load_annotations(csv)
    model = load_demo_model()
    rows = [row for row in _index(run) if row["image"] != "unannotated.png"]
    assert len(rows) == SCENES and all(row["status"] == "done" for row in rows)
    for row in rows:
        path = images / row["image"]
        with np.load(run / row["result"]) as arrays:
            saved = dict(arrays)
        tensor = _model_input(path)[None]
        with torch.no_grad():
            output = model(tensor)[0]
        top1 = int(output.argmax())
        assert row["top1"] == top1 == row["target"]  # no --classes: the top-1 class is explained
        assert row["probability"] == pytest.approx(float(torch.softmax(output.double(), 0)[top1]), abs=1e-6)
        geometry = resize_geometry(Image.open(path).size, (64, 64))
        assert row["image_size"] == [96, 80]
        annotation = annotations.for_image(row["image"])
        expected = evaluate_image(saved["maps"], saved["targets"], annotation, geometry, top1)
        assert row["localization"] == expected[0]
        gradcam = grad_cam(model, tensor, "features", torch.as_tensor(saved["targets"])[None]).maps[0]
        np.testing.assert_allclose(saved["gradcam_maps"], gradcam.numpy(), rtol=1e-5, atol=1e-6)
        assert row["gradcam_localization"] == evaluate_image(saved["gradcam_maps"], saved["targets"], annotation,
                                                             geometry, top1)[0]  # fmt: skip
        assert row["localization"]["mask_iou"] is not None  # the masks were read
        scale = 64 / 96, 64 / 80
        boxes = [obj.box for obj in annotation.objects]
        moved = [[x0 * scale[0], y0 * scale[1], x1 * scale[0], y1 * scale[1]] for x0, y0, x1, y1 in boxes]
        np.testing.assert_allclose([obj["box"] for obj in row["objects"]], moved, atol=1e-3)


def test_the_summary_is_that_of_the_records(run, capsys):
    rows = _index(run)
    unscored = [row for row in rows if row["image"] == "unannotated.png"]
    assert unscored and unscored[0]["localization"] is None and "gradcam_localization" in unscored[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["scored_images"] == SCENES and summary["unscored_images"] == 1
    for method, field in (("L2-CAF", "localization"), ("Grad-CAM", "gradcam_localization")):
        records = [row[field] for row in rows if row[field] is not None]
        box_iou = summary["methods"][method]["box IoU"]
        assert box_iou["mean"] == pytest.approx(np.mean([r["best_iou"] for r in records]))
        assert box_iou["count"] == SCENES and box_iou["low"] <= box_iou["mean"] <= box_iou["high"]
        pointing = summary["methods"][method]["pointing game"]
        assert pointing["mean"] == pytest.approx(np.mean([r["pointing"] for r in records]))
        error = summary["methods"][method]["top-1 loc. error"]
        assert error["mean"] == pytest.approx(1 - np.mean([r["top1_loc"] for r in records]))
        assert summarize(records)["box IoU"].low == pytest.approx(box_iou["low"])


def test_a_resumed_run_gives_the_same_summary(data, run, tmp_path, capsys):
    images, csv = data
    out = tmp_path / "out"
    shutil.copytree(run, out)
    for name in ("0.png.json", "sub/3.png.json"):  # as a run killed before these images were finished
        (out / "records" / name).unlink()
    (out / "summary.json").unlink()
    argv = ["run", str(images), "--out", str(out), *SETTINGS, "--annotations", str(csv), "--baseline", "gradcam"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"{SCENES - 1} skipped" in printed and "L2-CAF" in printed and "Grad-CAM" in printed
    assert (out / "summary.json").read_bytes() == (run / "summary.json").read_bytes()
    assert _index(out) == _index(run)
    assert main(argv) == 0  # nothing left: the same summary again
    assert f"{SCENES + 1} skipped" in capsys.readouterr().out
    assert (out / "summary.json").read_bytes() == (run / "summary.json").read_bytes()


def test_other_annotations_or_threshold_are_refused(data, run, tmp_path, capsys):
    images, csv = data
    config = (run / "config.json").read_text()
    assert json.loads(config)["annotations"] == {"path": str(csv.resolve()), "format": "csv", "threshold": 0.2}
    other = tmp_path / "other.csv"
    shutil.copy(csv, other)
    base = ["run", str(images), "--out", str(run), *SETTINGS]
    for options, named in ((["--annotations", str(csv), "--threshold", "0.5", "--baseline", "gradcam"], "threshold"),
                           (["--annotations", str(other), "--baseline", "gradcam"], "annotations.path"),
                           (["--annotations", str(csv)], "baseline 'gradcam' there, unset now"),
                           ([], "annotations.path")):  # fmt: skip
        assert main(base + options) == 2
        error = capsys.readouterr().err
        assert named in error and "pass another --out" in error
    assert (run / "config.json").read_text() == config


def test_a_folder_without_annotations_resumes_and_refuses_them(data, tmp_path, capsys):
    """Folders of runs made without annotations (older ones included) hold no such settings and resume."""
    images, csv = data
    out = tmp_path / "plain"
    argv = ["run", str(images), "--out", str(out), *SETTINGS]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert "annotations" not in config and "baseline" not in config
    assert not (out / "summary.json").exists() and "localization" not in _index(out)[0]
    capsys.readouterr()
    assert main(argv) == 0
    assert f"{SCENES + 1} skipped" in capsys.readouterr().out
    assert main(argv + ["--annotations", str(csv)]) == 2
    assert "annotations.path unset there" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, message",
    [
        (["--threshold", "0.3"], "--threshold sets where the CAM protocol cuts the maps of --annotations"),
        (["--annotations", "ANNOTATIONS", "--threshold", "0"], "--threshold must be a fraction"),
        (["--annotations", "missing.csv"], "does not exist"),
        (["--annotations", "STRANGERS"], "covers none of the 7 images"),
    ],
)
def test_wrong_localization_settings_are_refused_before_the_folder_is_made(options, message, data, tmp_path, capsys):
    images, csv = data
    strangers = tmp_path / "strangers.csv"
    strangers.write_text("elsewhere/a.png,1,0,0,5,5\n")
    replaced = [str(csv) if o == "ANNOTATIONS" else str(strangers) if o == "STRANGERS" else o for o in options]
    out = tmp_path / "out"
    assert main(["run", str(images), "--out", str(out), *SETTINGS, *replaced]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_baseline_that_does_not_run_at_the_layer_is_refused_at_once(data, tmp_path, monkeypatch, capsys):
    def no_grad_cam(*args, **kwargs):
        raise ValueError("layer 'features' outputs (1, 49, 768); the Grad-CAM baseline needs a 4-D map")

    monkeypatch.setattr(runner, "grad_cam", no_grad_cam)
    images, _ = data
    out = tmp_path / "out"
    assert main(["run", str(images), "--out", str(out), *SETTINGS, "--baseline", "gradcam"]) == 2
    error = capsys.readouterr().err
    assert "--baseline gradcam does not run at layer 'features'" in error and "needs a 4-D map" in error
    assert not out.exists()


def test_boxes_are_in_the_pixels_of_the_upright_picture(tmp_path):
    """A photo stored sideways with an EXIF orientation is read upright, and so is its size."""
    stored = Image.fromarray(np.zeros((40, 100, 3), np.uint8))  # 100 wide, 40 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter: 40 wide, 100 high
    stored.save(tmp_path / "turned.jpg", exif=exif)
    stored.save(tmp_path / "plain.jpg")
    assert upright_size(tmp_path / "turned.jpg") == (40, 100)
    assert upright_size(tmp_path / "plain.jpg") == (100, 40)
    with Image.open(tmp_path / "turned.jpg") as opened:
        assert ImageOps.exif_transpose(opened).size == (40, 100)
