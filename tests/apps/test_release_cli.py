"""`caffast class_oblivious` / `class_specific` as the official releases' scripts: their label table and
file names, --input_img from ./input_imgs/, their flags and defaults, the log file, the picture, and
the TensorFlow-style run (--tf-release); `caffast layers`."""

import re

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import caffast
from caffast.apps.cli import main
from caffast.apps.common import load_image
from caffast.models.zoo import build_model, feature_map_layers, release_labels

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \[INFO\] L2-CAF: (.*)$")
MONARCH = "monarch, monarch butterfly, milkweed butterfly, Danaus plexippus"


def log_messages(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    matches = [LOG_LINE.match(line) for line in lines]
    assert all(matches), lines
    return [match.group(1) for match in matches]


def run(*argv):
    return main([str(a) for a in argv])


def test_the_release_label_table():
    labels = release_labels()
    assert len(labels) == 1000 and labels[0] == "tench, Tinca tinca" and labels[323] == MONARCH
    assert labels[757] == "recreational vehicle, RV, R.V." and labels[134] == labels[517] == "crane"
    categories = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    assert sum(label.replace(",", "") != short for label, short in zip(labels, categories)) == 492


def test_class_specific_writes_the_releases_names_and_log(tmp_path, photo, capsys):
    out = tmp_path / "out"
    assert run("class_specific", "--input_img", photo, "--arch", "resnet18", "--weights", "random",
               "--cls_logits", "207, 323", "--output_dir", f"{out}/", "--min_error", 1e3) == 0
    pictures = sorted(p.name for p in out.glob("*.png"))
    assert pictures == ["photo_cls_specific_207_golden retriever_resnet18.png",
                        f"photo_cls_specific_323_{MONARCH.replace(',', '')}_resnet18.png"]
    for name in pictures:
        with Image.open(out / name) as picture:
            assert picture.size == (480, 480) and picture.mode == "RGBA"
    messages = log_messages(out / "l2_caf_log.txt")
    assert messages[0] == (
        f"Namespace(output_dir='{out}/', log_file='l2_caf_log.txt', input_img='{photo}', arch='resnet18', "
        "max_iter=500, lr=0.1, min_error=1000.0, cls_logits=[207, 323], logger=<Logger L2-CAF (DEBUG)>)"
    )
    assert messages[1].startswith("caffast: weights='random', layer=None, constraint='l2norm', optimizer='sgd'")
    assert messages[2] == f"Top K=2 ['golden retriever', '{MONARCH}']"
    # min_error 1000 stops at the check of iteration 50 (the first check compares with 32767; this
    # model's losses are far below 1000): the release counts 50 there, after taking 51 steps
    assert messages[3:] == ["Done after 50 iterations"] * 2
    printed = capsys.readouterr()
    assert printed.out.splitlines() == [f"saved {out / name}" for name in pictures]
    assert "L2-CAF: Done after 50 iterations" in printed.err  # the log goes to stderr too, as the release's


@pytest.mark.parametrize("min_error,expected", [(0.0, "Done after 7 iterations"), (1e9, "Done after 0 iterations")])
def test_done_counts_as_the_release(tmp_path, photo, min_error, expected):
    """No stop: max_iter; a stop at the first check (only a huge min_error gets there): 0."""
    out = tmp_path / "out"
    assert run("class_oblivious", "--input_img", photo, "--arch", "resnet18", "--weights", "random", "--max_iter", 7,
               "--output_dir", out, "--min_error", min_error, "--log_file", "run.log") == 0
    messages = log_messages(out / "run.log")
    assert messages[-1] == expected and not any(m.startswith("Top K") for m in messages)
    assert "max_iter=7, lr=0.1" in messages[0] and "cls_logits=None" in messages[0]
    assert (out / "photo_cls_oblivious_resnet18.png").is_file()


def test_input_img_is_read_from_input_imgs_as_the_release_does(tmp_path, photo, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "input_imgs").mkdir()
    photo.rename(tmp_path / "input_imgs" / "dog.png")
    argv = ["class_oblivious", "--arch", "resnet18", "--weights", "random", "--max_iter", 3, "--learning-rate", 0.5,
            "--cls_logits", "1,2"]  # --cls_logits is ignored here, as by the release
    assert run(*argv, "--input_img", "dog.png") == 0
    assert (tmp_path / "output_heatmaps" / "dog_cls_oblivious_resnet18.png").is_file()
    assert "lr=0.5" in log_messages(tmp_path / "output_heatmaps" / "l2_caf_log.txt")[0]
    assert run(*argv, "--input_img", tmp_path / "input_imgs" / "dog.png", "--output_dir", "paths") == 0
    assert (tmp_path / "paths" / "dog_cls_oblivious_resnet18.png").is_file()
    capsys.readouterr()
    assert run(*argv, "--input_img", "cat.png") == 2
    assert "caffast: error: --input_img 'cat.png' is neither in ./input_imgs/" in capsys.readouterr().err


def test_the_no_argument_run_is_the_releases(tmp_path, monkeypatch, capsys):
    """Without arguments: densenet169, 1000 iterations, lr 0.5, dog_butterfly.jpg and its weights
    (which cannot be downloaded here)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "cache"))
    (tmp_path / "input_imgs").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "input_imgs" / "dog_butterfly.jpg")
    assert main(["class_oblivious"]) == 2
    printed = capsys.readouterr()
    assert printed.out.startswith("Loading the default parameters")
    assert "cannot download torchvision weights DenseNet169_Weights.IMAGENET1K_V1" in printed.err
    messages = log_messages(tmp_path / "output_heatmaps" / "l2_caf_log.txt")
    assert messages[0] == (
        "Namespace(output_dir='./output_heatmaps/', log_file='l2_caf_log.txt', input_img='dog_butterfly.jpg', "
        "arch='densenet169', max_iter=1000, lr=0.5, min_error=1e-06, cls_logits=None, logger=<Logger L2-CAF (DEBUG)>)"
    )


def test_tf_release_run(tmp_path, photo):
    """--tf-release: TF1's Adam from a normal draw, lr 0.5, a schedule to 0, the TensorFlow release's
    file names, the raw mask, and its GIF (a frame per 50 iterations, 1 s each, alpha 0.7)."""
    out = tmp_path / "out"
    model = build_model("resnet18")
    torch.save(model.state_dict(), tmp_path / "resnet18.pth")
    assert run("class_specific", "--input_img", photo, "--arch", "resnet18", "--weights", tmp_path / "resnet18.pth",
               "--tf-release", "--seed", 3, "--cls_logits", 207, "--max_iter", 120, "--save_gif", "--output_dir", out) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "l2_caf_log.txt", "photo_cls_207_l2norm.png", "photo_cls_207_resnet18_layer4.gif", "photo_msk_cls_207_l2norm.png"]
    messages = log_messages(out / "l2_caf_log.txt")
    assert "max_iter=120, lr=0.5" in messages[0]
    assert "optimizer='adam_tf1', init='normal', seed=3, end_lr=0.0" in messages[1]
    rgb, tensor = load_image(str(photo))
    exp = caffast.explain(model, tensor[None], "layer4", mode="specific", targets=[207], max_iter=120,
                          lr=0.5, optimizer="adam_tf1", init="normal", seed=3, end_lr=0.0, history=True,
                          loss="release")
    heat = exp.maps[0, 0].numpy()
    with Image.open(out / "photo_msk_cls_207_l2norm.png") as mask:
        assert mask.mode == "L" and mask.size == (7, 7)
        np.testing.assert_array_equal(np.asarray(mask), np.floor(heat.astype(np.float64) * 255 + 0.499999999))
    with Image.open(out / "photo_cls_207_resnet18_layer4.gif") as gif:
        assert gif.n_frames == 3 and gif.size == (480, 480)  # iterations 0, 50 and 100
        assert gif.info["duration"] == 1000
        frame = np.asarray(gif.convert("RGB")).astype(float)
    first = exp.history[0][1][0, 0].numpy()
    pictures = {alpha: np.asarray(caffast.apply_heatmap(rgb, first, alpha=alpha, style="release").convert("RGB"))
                for alpha in (0.6, 0.7)}  # fmt: skip
    assert np.abs(frame - pictures[0.7]).mean() < np.abs(frame - pictures[0.6]).mean()


def test_tf_release_class_oblivious_names(tmp_path, photo):
    out = tmp_path / "out"
    assert run("class_oblivious", "--input_img", photo, "--arch", "resnet18", "--weights", "random", "--tf_release",
               "--max_iter", 5, "--filter_type", "softmax", "--output_dir", out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["l2_caf_log.txt", "photo_softmax.png"]


def test_layers_lists_the_4d_outputs_at_224(capsys):
    assert main(["layers", "--arch", "resnet18"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("resnet18 at 224 x 224: 66 modules")
    rows = {line.split()[0]: line.split(None, 1)[1] for line in lines[1:]}
    assert rows["conv1"] == "(64, 112, 112)" and rows["layer4"] == "(512, 7, 7)  7x7 fused  <- default"
    assert rows["layer4.1.conv2"] == "(512, 7, 7)  7x7 generic"  # tried: one of the last 12 with a grid
    assert rows["layer1.0.relu"] == "(64, 56, 56)  (2 calls)" and rows["avgpool"] == "(512, 1, 1)"
    assert "fc" not in rows and "" not in rows


def test_feature_map_layers_leaves_no_hooks():
    model = build_model("resnet18")
    found = dict(feature_map_layers(model, 64))
    assert found["layer4"] == [(512, 2, 2)]
    assert not any(module._forward_hooks for module in model.modules())
    grey = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU())
    with pytest.raises(RuntimeError):
        feature_map_layers(grey)  # takes one channel, gets three
    assert not any(module._forward_hooks for module in grey.modules())


def test_unknown_class_indices_fail_with_one_line(tmp_path, photo, capsys):
    assert run("class_specific", "--input_img", photo, "--weights", "random", "--cls_logits", "dog",
               "--output_dir", tmp_path) == 2
    assert capsys.readouterr().err.startswith("caffast: error: classes must be comma-separated integers")
