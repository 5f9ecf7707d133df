"""The command line end to end on the shipped model and on random torchvision weights."""

import os
import pickle
import subprocess
import sys

import pytest
import torch
from PIL import Image

from caffast.apps.cli import main, output_stems
from caffast.eval.localization import evaluate_scenes
from caffast.models.source import ModelSource


def test_demo_writes_pictures_and_prints_the_comparison(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--scenes", "6", "--max-iter", "150"]) == 0
    printed = capsys.readouterr().out
    assert "pointing game" in printed and "Grad-CAM" in printed and "L2-CAF" in printed
    pictures = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "scene.png" in pictures and "l2caf_oblivious.png" in pictures and len(pictures) >= 6
    assert len(list(tmp_path.glob("*.gif"))) == 3
    sizes = {Image.open(p).size for p in tmp_path.glob("*.png")}
    assert len(sizes) == 1


def test_explain_image_files(tmp_path, photo, capsys):
    code = main(["explain", str(photo), str(photo), "--arch", "resnet18", "--weights", "random", "--classes", "3,7",
                 "--max-iter", "20", "--out", str(tmp_path / "out"), "--gif"])
    assert code == 0
    assert "wrote 2 overlays" in capsys.readouterr().out  # the image given twice has its two files
    names = ModelSource("resnet18", "random").class_names(1000)
    expected = {f"photo_l2caf_{k}_{names[k].replace(' ', '_')}_resnet18.{ext}" for k in (3, 7) for ext in ("png", "gif")}
    written = expected | {"photo_l2caf_specific_resnet18.npz", ".caffast-explain"}
    assert {p.name for p in (tmp_path / "out").iterdir()} == written
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
    (picture,) = out.glob("*.png")
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


class Unsafe:
    """A class torch.load(weights_only=True) refuses to rebuild."""


class RunsCode:
    """Unpickled, it would call os.getcwd (harmless here): the shape of a malicious weights file."""

    def __reduce__(self):
        return os.getcwd, ()


@pytest.fixture
def weight_files(tmp_path):
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    (tmp_path / "text.pth").write_text("not weights")
    torch.save({"fc.weight": Unsafe()}, tmp_path / "unsafe.pth")
    torch.save({"fc.weight": RunsCode()}, tmp_path / "runs-code.pth")
    (tmp_path / "plain-pickle.pth").write_bytes(pickle.dumps({"fc.bias": [0.0]}, protocol=4))
    (tmp_path / "a-file").write_text("")
    return tmp_path


@pytest.mark.parametrize(
    "argv,message",
    [
        (["explain", "{photo}", "--device", "cuda:99"], "--device cuda:99: this machine has"),
        (["explain", "{photo}", "--device", "toaster"], "unknown device 'toaster': pass cpu, cuda or cuda:N"),
        (["explain", "{photo}", "--device", "cpu", "--backend", "triton"], "--backend triton with --device cpu"),
        (["explain", "{photo}", "--out", "{files}/a-file"], "is a file, not a folder"),
        (["explain", "{photo}", "--out", "{files}/a-file/below"], "a file, not a folder"),
        (["explain", "{photo}", "--weights", "{files}/other.pth"], "do not fit --arch resnet18 (Error(s) in loading"),
        (["explain", "{photo}", "--weights", "{files}/text.pth"], "is not a PyTorch state-dict file"),
        (["explain", "{photo}", "--weights", "{files}/unsafe.pth"], "is refused for safety"),
        (["explain", "{photo}", "--weights", "{files}/runs-code.pth"], "was not loaded: it tries to run code ("),
        (["explain", "{photo}", "--classes", " "], "classes ' ' name no class"),
        (["explain", "{photo}", "--weights", "{files}/plain-pickle.pth"], "(UnpicklingError: Unsupported operand"),
        (["explain", "{photo}", "--classes", "5,5"], "name 5 more than once: list each class once"),
        (["explain", "{photo}", "--max-iter", "0"], "--max-iter must be at least 1, got 0"),
        (["class_oblivious", "--input_img", "{photo}", "--max_iter", "0"], "--max_iter must be at least 1, got 0"),
        (["evaluate", "--scenes", "0"], "--scenes must be at least 1, got 0"),
        (["evaluate", "--max-iter", "0"], "--max-iter must be at least 1, got 0"),
        (["demo", "--max-iter", "0", "--out", "{files}/demo"], "--max-iter must be at least 1, got 0"),
        (["demo", "--scenes", "0", "--out", "{files}/demo"], "--scenes must be at least 1, got 0"),
    ],
)
def test_command_line_mistakes_get_one_line(argv, message, photo, weight_files, capsys):
    model = ["--arch", "resnet18"] + ([] if any("weights" in a for a in argv) else ["--weights", "random"])
    argv = [a.replace("{photo}", str(photo)).replace("{files}", str(weight_files)) for a in argv]
    if argv[0] in ("explain", "class_oblivious"):
        argv += model + ([] if "--out" in argv else ["--out" if argv[0] == "explain" else "--output_dir",
                                                     str(weight_files / "out")])  # fmt: skip
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("caffast: error: ") and error.count("\n") == 1, error
    assert message in error
    assert not (weight_files / "out").exists() and not (weight_files / "demo").exists()


def test_the_refusal_of_an_unsafe_pickle_tells_how_to_convert_it(weight_files, photo, capsys):
    path = weight_files / "unsafe.pth"
    assert main(["explain", str(photo), "--arch", "resnet18", "--weights", str(path), "--out", str(weight_files)]) == 2
    error = capsys.readouterr().err
    assert f"{Unsafe.__module__}.Unsafe" in error and f"torch.load('{path}', weights_only=False)" in error


def test_without_a_gpu_cuda_is_refused(photo, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["explain", str(photo), "--weights", "random", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "no usable CUDA GPU; pass --device cpu" in capsys.readouterr().err


def test_a_read_only_output_folder_is_refused(photo, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: have the check see what another user would
        access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: access(path, mode) and os.fspath(path) != str(folder))
    try:
        assert main(["explain", str(photo), "--weights", "random", "--out", str(folder / "maps")]) == 2
    finally:
        folder.chmod(0o755)
    assert "is read-only for this user" in capsys.readouterr().err and not (folder / "maps").exists()


def test_inputs_that_share_a_stem_get_their_own_overlays(tmp_path, capsys):
    """x/dog.png, y/dog.png and x/dog.jpg are three images: three overlays, each the one its image gets
    when explained alone; the same file given again under another path is explained once."""
    inputs = [tmp_path / "x" / "dog.png", tmp_path / "y" / "dog.png", tmp_path / "x" / "dog.jpg"]
    for colour, path in zip([(200, 30, 30), (30, 200, 30), (30, 30, 200)], inputs):
        path.parent.mkdir(exist_ok=True)
        picture = Image.new("RGB", (64, 64), colour)
        picture.paste((255, 255, 255), (8 * len(path.parent.name + path.suffix), 0, 64, 20))
        picture.save(path)
    again = tmp_path / "x" / ".." / "x" / "dog.png"
    settings = ["--arch", "shufflenet_v2_x0_5", "--layer", "conv5", "--weights", "random", "--mode", "oblivious",
                "--max-iter", "2"]

    def explain_into(out, *images):
        torch.manual_seed(0)  # the same random weights in every run
        assert main(["explain", *map(str, images), *settings, "--out", str(out)]) == 0
        return sorted(out.glob("*.png"))

    together = explain_into(tmp_path / "together", *inputs, again)
    assert "wrote 3 overlays" in capsys.readouterr().out
    alone = [explain_into(tmp_path / f"alone{k}", path)[0] for k, path in enumerate(inputs)]
    assert len(together) == 3 and len({p.name for p in together}) == 3
    assert sorted(p.read_bytes() for p in together) == sorted(p.read_bytes() for p in alone)
    assert len({p.read_bytes() for p in alone}) == 3


def test_output_names_differ_by_more_than_letter_case(tmp_path):
    """Dog.png and dog.png are one file on some file systems; a path-made name that is some other
    file's stem is numbered on."""
    (tmp_path / "a").mkdir()
    paths = [str(tmp_path / name) for name in ("Dog.png", "dog.png", "a/cat.png", "a_cat_png.jpg", "cat.png")]
    stems = output_stems(paths)
    assert stems[paths[0]] == "Dog_png" and stems[paths[1]] == "dog_png_2"
    assert stems[paths[2]] == "a_cat_png" and stems[paths[3]] == "a_cat_png_2" and stems[paths[4]] == "cat_png"
    assert set(output_stems([paths[2], str(tmp_path / "a" / ".." / "a" / "cat.png")]).values()) == {"cat"}


@pytest.mark.parametrize("flag", ["--cls_logits", "--classes"])
def test_a_class_beyond_any_integer_is_named_as_out_of_range(flag, photo, tmp_path, capsys):
    huge = "99999999999999999999999"
    if flag == "--cls_logits":
        argv = ["class_specific", "--input_img", str(photo), "--cls_logits", huge, "--output_dir", str(tmp_path)]
    else:
        argv = ["explain", str(photo), "--classes", huge, "--out", str(tmp_path)]
    assert main(argv + ["--arch", "shufflenet_v2_x0_5", "--layer", "conv5", "--weights", "random"]) == 2
    assert f"targets must be class indices in [0, 1000); got [[{huge}]]" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["class_specific", "class_oblivious", "explain"])
def test_a_long_picture_name_gives_outputs_that_fit(command, tmp_path, capsys):
    """A 250-byte stem cannot take the release's suffixes within the 255 bytes of a file name: the
    stem is shortened, the rest (class, label, arch) kept."""
    image = tmp_path / ("long" * 62 + "xy.png")
    Image.new("RGB", (40, 40), (90, 20, 160)).save(image)
    out = tmp_path / "out"
    model = ["--arch", "shufflenet_v2_x0_5", "--layer", "conv5", "--weights", "random"]
    if command == "explain":
        argv = ["explain", str(image), "--classes", "3", "--max-iter", "2", "--out", str(out)]
    else:
        argv = [command, "--input_img", str(image), "--cls_logits", "3", "--max_iter", "2", "--output_dir", str(out)]
    assert main(argv + model) == 0
    written = [path.name for path in out.glob("*.png")]
    assert len(written) == 1 and len(written[0].encode()) <= 255
    name = written[0]
    assert name.startswith("long" * 10) and "~" in name and name.endswith("_shufflenet_v2_x0_5.png")
    assert "_3_" in name or command == "class_oblivious"
