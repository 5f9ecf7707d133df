"""The command line end to end on the shipped model and on random torchvision weights."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from caffast.apps.cli import main
from caffast.apps.common import class_names
from caffast.eval.localization import evaluate_scenes


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    pixels = np.random.default_rng(0).integers(0, 255, size=(240, 300, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_demo_writes_pictures_and_prints_the_comparison(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--scenes", "6", "--max-iter", "150"]) == 0
    printed = capsys.readouterr().out
    assert "pointing game" in printed and "Grad-CAM" in printed and "L2-CAF" in printed
    pictures = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "scene.png" in pictures and "l2caf_oblivious.png" in pictures and len(pictures) >= 6
    assert len(list(tmp_path.glob("*.gif"))) == 3
    sizes = {Image.open(p).size for p in tmp_path.glob("*.png")}
    assert len(sizes) == 1


def test_explain_image_files(tmp_path, photo):
    code = main(["explain", str(photo), str(photo), "--arch", "resnet18", "--weights", "random", "--classes", "3,7",
                 "--max-iter", "20", "--out", str(tmp_path / "out"), "--gif"])
    assert code == 0
    names = class_names("resnet18", 1000)
    expected = {f"photo_l2caf_{k}_{names[k].replace(' ', '_')}_resnet18.{ext}" for k in (3, 7) for ext in ("png", "gif")}
    assert {p.name for p in (tmp_path / "out").iterdir()} == expected
    for name in expected:
        assert Image.open(tmp_path / "out" / name).size == (224, 224)


def test_reference_flags_and_file_names(tmp_path, photo):
    out = tmp_path / "output_heatmaps"
    code = main(["class_specific", "--input_img", str(photo), "--arch", "resnet50", "--weights", "random",
                 "--cls_logits", "207,323", "--max_iter", "10", "--output_dir", str(out)])
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["l2_caf_log.txt", "photo_cls_specific_207_golden retriever_resnet50.png",
                     "photo_cls_specific_323_monarch monarch butterfly milkweed butterfly Danaus plexippus_resnet50.png"]
    code = main(["class_oblivious", "--input_img", str(photo), "--arch", "resnet50", "--weights", "random",
                 "--max_iter", "10", "--output_dir", str(out)])
    assert code == 0 and (out / "photo_cls_oblivious_resnet50.png").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["explain", "missing.png", "--weights", "random"], "does not exist"),
        (["explain", "{photo}", "--arch", "resnet_9000", "--weights", "random"], "unknown architecture"),
        (["explain", "{photo}", "--arch", "resnet18", "--weights", "IMAGENET1K_V1"], "cannot download"),
        (["explain", "{photo}", "--arch", "resnet18", "--weights", "/no/such/file.pth"], "state-dict file"),
        (["explain", "{photo}", "--arch", "alexnet", "--weights", "random"], "pass --layer"),
    ],
)
def test_errors_exit_with_a_message(argv, message, photo, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))
    argv = [a.replace("{photo}", str(photo)) for a in argv] + ["--out", str(tmp_path)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_console_entry_point():
    result = subprocess.run([sys.executable, "-m", "caffast", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "demo" in result.stdout


def test_l2caf_points_at_the_object():
    """Single-object scenes from the shipped model: L2-CAF's maximum lies on the object."""
    results = evaluate_scenes(50, max_iter=1000, objects=1)
    assert results["L2-CAF gd abs"]["pointing game"] >= 0.8


def test_map_and_solver_options(tmp_path, photo):
    out = tmp_path / "out"
    code = main(["explain", str(photo), "--arch", "resnet18", "--weights", "random", "--classes", "3",
                 "--map", "signed", "--solver", "exact", "--out", str(out)])
    assert code == 0
    (picture,) = out.iterdir()
    assert Image.open(picture).size == (224, 224)
    with pytest.raises(SystemExit):
        main(["explain", str(photo), "--map", "bogus"])


def test_evaluate_reports_every_solver_and_map(capsys):
    assert main(["evaluate", "--scenes", "3", "--max-iter", "50"]) == 0
    printed = capsys.readouterr().out
    for solver in ("gd", "exact"):
        for kind in ("abs", "positive", "signed"):
            assert f"L2-CAF {solver} {kind}" in printed
    assert "Grad-CAM" in printed and "IoU AUC" in printed
