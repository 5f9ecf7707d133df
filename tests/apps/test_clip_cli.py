"""The command line on clips and volumes: `caffast explain` on a folder of frames, a .npy volume
and a video file, and `caffast run` over volumes.

Each map the commands save is compared with caffast.explain's on the input prepared here, by a
restatement of the documented preprocessing in plain PyTorch: frames sampled evenly, resized
bilinearly (no antialiasing) to 128 x 171, centre-cropped to 112, normalized by Kinetics' mean and
std; a volume z-scored (or min-max scaled) per channel, one channel repeated to r3d_18's three.
The model is r3d_18 with its seeded random weights, on 4 frames.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import caffast
from caffast import viz
from caffast.apps import clipfiles, runner
from caffast.apps.cli import main
from caffast.models.source import ModelSource

KINETICS_MEAN = torch.tensor([0.43216, 0.394666, 0.37645])
KINETICS_STD = torch.tensor([0.22803, 0.22145, 0.216989])
MAX_ITER = 10


@pytest.fixture(scope="module")
def r3d():
    return ModelSource("r3d_18", "random").load()


def clip_input(frames: np.ndarray) -> torch.Tensor:
    """(D, H, W, 3) uint8 frames as r3d_18 takes them: (1, 3, D, 112, 112)."""
    clip = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255
    clip = F.interpolate(clip, size=(128, 171), mode="bilinear", align_corners=False)
    top, left = (128 - 112) // 2, round((171 - 112) / 2)
    clip = clip[:, :, top : top + 112, left : left + 112]
    clip = (clip - KINETICS_MEAN[:, None, None]) / KINETICS_STD[:, None, None]
    return clip.permute(1, 0, 2, 3)[None]


def expected_maps(model: torch.nn.Module, inputs: torch.Tensor) -> np.ndarray:
    return caffast.explain(model, inputs, "layer4", mode="specific", max_iter=MAX_ITER).maps[0].numpy()


def explain_args(path, out, *options: str) -> list[str]:
    return ["explain", str(path), "--arch", "r3d_18", "--weights", "random", "--frames", "4", "--max-iter",
            str(MAX_ITER), "--out", str(out), "--quiet", *options]  # fmt: skip


def saved(out, stem: str) -> tuple[np.ndarray, dict]:
    with np.load(out / f"{stem}_l2caf_specific_r3d_18.npz", allow_pickle=False) as arrays:
        return arrays["maps"], json.loads(str(arrays["settings"]))


def random_frames(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 40, 50, 3), dtype=np.uint8)


def test_explain_a_folder_of_frames(r3d, tmp_path, capsys):
    """Ten frames named f1 ... f10 (f10 last: natural order); four are sampled, 0, 3, 6 and 9."""
    frames = random_frames(10, 0)
    folder = tmp_path / "walk"
    folder.mkdir()
    for number, frame in enumerate(frames, 1):
        Image.fromarray(frame).save(folder / f"f{number}.png")
    out = tmp_path / "out"
    assert main(explain_args(folder, out, "--input-kind", "frames")) == 0
    encoder = viz.video_encoder()
    videos = ", 1 MP4 videos" if encoder else ""
    assert f"wrote 1 overlays, 1 GIFs{videos} and 1 .npz files of maps" in capsys.readouterr().out
    maps, settings = saved(out, "walk")
    np.testing.assert_allclose(maps, expected_maps(r3d, clip_input(frames[[0, 3, 6, 9]])), rtol=0, atol=1e-6)
    assert settings["kind"] == "frames" and settings["input"]["frames"] == 4 and settings["input"]["resize"] == [128, 171]
    (picture,) = out.glob("walk_l2caf_*.png")
    gif = Image.open(picture.with_suffix(".gif"))
    assert gif.n_frames == 4 and gif.size == (112, 112)
    assert Image.open(picture).size == (2 * 112 + 1, 2 * 112 + 1)  # a montage of the four frames, 2 x 2
    assert picture.with_suffix(".mp4").is_file() == (encoder is not None)
    if encoder is not None and importlib.util.find_spec("cv2") is not None:
        import cv2

        video = cv2.VideoCapture(str(picture.with_suffix(".mp4")))
        assert video.get(cv2.CAP_PROP_FRAME_COUNT) == 4
        assert (video.get(cv2.CAP_PROP_FRAME_WIDTH), video.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (112, 112)
        video.release()


def test_explain_a_clip_without_an_mp4_encoder_writes_its_gif(tmp_path, capsys, monkeypatch):
    """No encoder importable: the GIF and montage only, and no error."""
    for module in ("cv2", "av"):
        monkeypatch.setitem(sys.modules, module, None)
    folder = tmp_path / "walk"
    folder.mkdir()
    for number, frame in enumerate(random_frames(2, 5)):
        Image.fromarray(frame).save(folder / f"{number}.png")
    assert main(explain_args(folder, tmp_path / "out", "--input-kind", "frames")) == 0
    assert "wrote 1 overlays, 1 GIFs and 1 .npz files of maps" in capsys.readouterr().out
    assert not list((tmp_path / "out").glob("*.mp4"))


@pytest.mark.parametrize("shape, scaling", [((4, 32, 32), None), ((3, 4, 32, 32), "minmax")])
def test_explain_a_volume(r3d, tmp_path, shape, scaling):
    volume = np.random.default_rng(1).normal(3.0, 2.0, shape)
    np.save(tmp_path / "scan.npy", volume)
    out = tmp_path / "out"
    options = ["--axis", "coronal"] + (["--volume-norm", scaling] if scaling else [])
    assert main(explain_args(tmp_path / "scan.npy", out, *options)) == 0
    tensor = torch.from_numpy(volume).float().reshape(-1, *shape[-3:])
    flat = tensor.flatten(1)
    if scaling == "minmax":
        low, high = flat.min(1).values, flat.max(1).values
        tensor = (tensor - low[:, None, None, None]) / (high - low)[:, None, None, None]
    else:
        tensor = (tensor - flat.mean(1)[:, None, None, None]) / flat.std(1, unbiased=False)[:, None, None, None]
    maps, settings = saved(out, "scan")
    assert maps.shape == (1, 1, 2, 2)  # layer4's grid of a 4 x 32 x 32 volume
    np.testing.assert_allclose(maps, expected_maps(r3d, tensor.expand(3, -1, -1, -1)[None]), rtol=0, atol=1e-5)
    assert settings["kind"] == "volume" and settings["input"]["volume"] == (scaling or "zscore")
    (picture,) = out.glob("scan_l2caf_*.png")
    # coronal slices are D x W (4 x 32); 16 of the 32 picked, 4 to a row, a pixel between tiles
    assert Image.open(picture).size == (4 * 33 - 1, 4 * 5 - 1)
    assert not list(out.glob("*.gif"))


def test_explain_a_video(r3d, tmp_path, capsys):
    """A lossless video (FFV1) where OpenCV can write one; its nine frames sampled at 0, 3, 5 and 8."""
    cv2 = pytest.importorskip("cv2")
    frames = random_frames(9, 2)
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), 10, (50, 40))
    if not writer.isOpened():
        pytest.skip("this OpenCV writes no FFV1 video")
    for frame in frames:
        writer.write(np.ascontiguousarray(frame[..., ::-1]))  # OpenCV takes BGR
    writer.release()
    out = tmp_path / "out"
    assert main(explain_args(path, out)) == 0
    assert clipfiles.sample_frames(9, 4) == [0, 3, 5, 8]
    maps, settings = saved(out, "clip")
    np.testing.assert_allclose(maps, expected_maps(r3d, clip_input(frames[[0, 3, 5, 8]])), rtol=0, atol=1e-6)
    assert settings["kind"] == "video"
    assert Image.open(next(out.glob("clip_l2caf_*.gif"))).n_frames == 4


def test_without_a_video_decoder_the_error_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(clipfiles, "video_decoder", lambda: None)
    monkeypatch.setattr(runner, "video_decoder", lambda: None)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "clip.mp4").write_bytes(b"not decoded")
    assert main(explain_args(tmp_path / "data" / "clip.mp4", tmp_path / "out")) == 2
    error = capsys.readouterr().err
    assert error.startswith("caffast: error: cannot read video") and error.count("\n") == 1
    for advice in ("pip install av", "pip install torchcodec", "pip install opencv-python-headless", "--input-kind frames"):
        assert advice in error
    assert main(["run", str(tmp_path / "data"), "--out", str(tmp_path / "maps"), "--arch", "r3d_18", "--weights",
                 "random", "--quiet"]) == 2  # fmt: skip
    assert "holds videos and no video decoder is installed: pip install av" in capsys.readouterr().err
    assert not (tmp_path / "maps").exists()


@pytest.mark.parametrize("argv, message", [
    (["x.npy", "--arch", "resnet18"], "'x.npy' is a volume, and --arch resnet18 takes images: pass a model that takes clips"),
    (["x.png", "--arch", "r3d_18"], "'x.png' is an image, and --arch r3d_18 takes clips: pass a video, a .npy volume"),
    (["walk", "--arch", "r3d_18"], "'walk' is a folder: caffast run explains the images in a folder; with a model that takes clips, "
                                   "--input-kind frames"),
    (["a.png", "--arch", "resnet18", "--frames", "8"], "--frames applies to clips and volumes, and --arch resnet18 takes images"),
    (["x.npy", "--arch", "r3d_18", "--gif"], "--gif draws an image's map converging"),
])  # fmt: skip
def test_inputs_of_the_other_kind_are_refused(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "walk").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    np.save(tmp_path / "x.npy", np.zeros((4, 8, 8)))
    assert main(["explain", *argv, "--weights", "random", "--out", "out"]) == 2
    assert message in capsys.readouterr().err


def test_run_over_volumes_resumes(r3d, tmp_path, capsys):
    """Two volumes explained, then the same command again explains nothing; the maps are explain's."""
    data = tmp_path / "data"
    data.mkdir()
    volumes = {name: np.random.default_rng(seed).normal(size=(4, 32, 32)) for seed, name in enumerate(("a", "b"))}
    for name, volume in volumes.items():
        np.save(data / f"{name}.npy", volume)
    np.save(tmp_path / "outside.npy", volumes["a"])
    out = tmp_path / "maps"
    argv = ["run", str(data), "--out", str(out), "--arch", "r3d_18", "--weights", "random", "--max-iter",
            str(MAX_ITER), "--quiet", "--overlays"]  # fmt: skip
    assert main(argv) == 0
    assert "2 inputs done, 0 failed, 0 skipped" in capsys.readouterr().out
    assert main(argv) == 0
    assert "0 inputs done, 0 failed, 2 skipped (finished before)" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [(row["image"], row["status"]) for row in rows] == [("a.npy", "done"), ("b.npy", "done")]
    config = json.loads((out / "config.json").read_text())
    assert config["input"]["volume"] == "zscore" and config["inputs"] is None
    for row in rows:
        assert (out / row["overlay"]).is_file()
        tensor = torch.from_numpy(volumes[row["image"][0]]).float()
        tensor = (tensor - tensor.mean()) / tensor.flatten().std(unbiased=False)
        with np.load(out / row["result"]) as arrays:
            # explained in a batch of two, so the reduction order may differ from one alone
            np.testing.assert_allclose(arrays["maps"], expected_maps(r3d, tensor.expand(3, -1, -1, -1)[None]),
                                       rtol=0, atol=1e-5)  # fmt: skip
    assert not math.isnan(rows[0]["loss"])


def test_a_folder_of_frame_folders(tmp_path):
    """Each folder that directly holds image files is a clip; images beside the clips belong to none."""
    for folder in ("b", "a", "a/inner", "empty"):
        (tmp_path / folder).mkdir()
    for path in ("b/1.png", "a/1.jpg", "a/inner/1.png", "loose.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / path)
    assert clipfiles.find_inputs(tmp_path, "frames") == ["a", "a/inner", "b"]
    assert clipfiles.frame_files(tmp_path / "a") == ["1.jpg"]


def test_run_over_frame_folders_explains_a_changed_clip_again(tmp_path, capsys):
    """With --input-kind frames each folder of frames is one clip; a rerun skips both, and explains
    again the clip one of whose frames changed."""
    data = tmp_path / "data"
    for seed, clip in enumerate(("jump", "walk")):
        (data / clip).mkdir(parents=True)
        for number, frame in enumerate(random_frames(3, seed)):
            Image.fromarray(frame).save(data / clip / f"{number}.png")
    argv = ["run", str(data), "--out", str(tmp_path / "maps"), "--arch", "r3d_18", "--weights", "random",
            "--input-kind", "frames", "--frames", "2", "--max-iter", "3", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert "2 inputs done, 0 failed, 0 skipped" in capsys.readouterr().out
    assert main(argv) == 0
    assert "0 inputs done, 0 failed, 2 skipped" in capsys.readouterr().out
    Image.fromarray(random_frames(1, 7)[0]).save(data / "walk" / "1.png")
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "1 inputs done, 0 failed, 1 skipped" in printed.out and "walk (the image file changed" in printed.err


def test_run_overlays_of_a_clip_include_its_gif(tmp_path, capsys):
    """--overlays writes a clip's montage and the GIF of its map over the frames, the frames that
    viz.overlay_frames draws from the saved map; a rerun finds both and skips the clip, and a GIF
    removed since makes it explained again."""
    data = tmp_path / "data"
    (data / "jump").mkdir(parents=True)
    frames = random_frames(3, 4)
    for number, frame in enumerate(frames):
        Image.fromarray(frame).save(data / "jump" / f"{number}.png")
    out = tmp_path / "maps"
    argv = ["run", str(data), "--out", str(out), "--arch", "r3d_18", "--weights", "random", "--input-kind", "frames",
            "--frames", "2", "--max-iter", "3", "--quiet", "--overlays"]  # fmt: skip
    assert main(argv) == 0
    (row,) = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert row["overlay"].endswith(".png") and row["overlay_gif"] == row["overlay"][: -len(".png")] + ".gif"
    gif = Image.open(out / row["overlay_gif"])
    with np.load(out / row["result"]) as arrays:
        heat = arrays["maps"][0]
    clip = clip_input(frames[[0, 2]])[0] * KINETICS_STD[:, None, None, None] + KINETICS_MEAN[:, None, None, None]
    expected = viz.overlay_frames(clip.clamp(0, 1), heat)
    assert gif.n_frames == 2 and gif.size == (112, 112)
    for index, picture in enumerate(expected):
        gif.seek(index)
        difference = np.abs(np.asarray(gif.convert("RGB"), dtype=float) - np.asarray(picture, dtype=float))
        assert difference.mean() < 8  # out of 255: the GIF keeps 256 colours of these noise frames
        assert np.median(difference) <= 5
    capsys.readouterr()
    assert main(argv) == 0
    assert "0 inputs done, 0 failed, 1 skipped" in capsys.readouterr().out
    (out / row["overlay_gif"]).unlink()
    assert main(argv) == 0
    assert "1 inputs done, 0 failed, 0 skipped" in capsys.readouterr().out
    assert (out / row["overlay_gif"]).is_file()


def _five_d_outputs(model: torch.nn.Module, inputs: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Every named module's first 5-D output shape (C, D, H, W), by forward hooks of this test's own."""
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str):
        def record(_module, _inputs, output) -> None:
            if isinstance(output, torch.Tensor) and output.dim() == 5:
                shapes.setdefault(name, tuple(output.shape[1:]))

        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules() if name]
    with torch.no_grad():
        model(inputs)
    for handle in handles:
        handle.remove()
    return shapes


def test_layers_of_a_clip_model(r3d, capsys):
    """`caffast layers --arch r3d_18 --size 4,32,32`: every module with a 5-D output, its (C, D, H, W)
    as hooks on the plain model see it, and the last layers tried: layer4's 1 x 2 x 2 grid, fused,
    as caffast.explain says on the same noise clip."""
    assert main(["layers", "--arch", "r3d_18", "--size", "4,32,32", "--check", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("r3d_18 at 4 x 32 x 32: 90 modules output a 5-D map, shown as (C, D, H, W)")
    rows = {line.split()[0]: line.split(None, 1)[1] for line in lines[1:]}
    expected = _five_d_outputs(r3d, torch.zeros(1, 3, 4, 32, 32))
    assert list(rows) == list(expected)
    for name, shape in expected.items():
        assert rows[name].startswith(str(shape))
    noise = torch.randn(1, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    trial = caffast.explain(r3d, noise, "layer4", mode="specific", max_iter=1, check_every=1)
    assert trial.path == "fused" and tuple(trial.maps.shape) == (1, 1, 1, 2, 2)
    assert rows["layer4"] == "(512, 1, 2, 2)  1x2x2 fused  <- default"
    assert rows["layer4.1"] == "(512, 1, 2, 2)  1x2x2 fused" and rows["layer3"] == "(256, 1, 4, 4)"


def test_layers_of_a_clip_model_on_a_volume_and_its_sizes(tmp_path, capsys):
    """--image takes a volume (its own shape is the grid); --size forms: one side takes the
    preprocessing's 16 frames, D,H,W for clips only."""
    from caffast.apps.cli import layers_grid

    np.save(tmp_path / "scan.npy", np.random.default_rng(0).normal(size=(2, 32, 48)))
    assert main(["layers", "--arch", "r3d_18", "--image", str(tmp_path / "scan.npy"), "--check", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("r3d_18 at 2 x 32 x 48: ") and f"tried on {tmp_path / 'scan.npy'}" in lines[0]
    assert any(line.split()[0] == "layer4" and "(512, 1, 2, 3)  1x2x3 fused" in line for line in lines[1:])
    assert layers_grid(None, "r3d_18", True, 112, 16) == (16, 112, 112)
    assert layers_grid("64", "r3d_18", True, 112, 16) == (16, 64, 64)
    assert layers_grid("8x48x64", "r3d_18", True, 112, 16) == (8, 48, 64)
    assert layers_grid("96", "resnet18", False, 224, 1) == (96, 96)
    for argv, message in ((["--arch", "resnet18", "--size", "4,32,32"], "D,H,W is for models that take clips"),
                          (["--arch", "r3d_18", "--size", "4,32"], "--size takes one side, or D,H,W"),
                          (["--arch", "r3d_18", "--size", "0,32,32"], "--size must be positive")):  # fmt: skip
        assert main(["layers", "--weights", "random", *argv]) == 2
        assert message in capsys.readouterr().err
