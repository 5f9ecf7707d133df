"""Progress on long commands: a bar on a terminal, periodic lines elsewhere, one per rank under
torchrun, nothing with --quiet, and movement within a batch from the solver's checks."""

import io
import json
import math
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from caffast import explain
from caffast.apps import common
from caffast.apps.cli import main
from caffast.apps.common import Progress, load_image
from caffast.core.loop import work_done
from caffast.eval import localization
from caffast.eval.localization import evaluate_scenes
from caffast.eval.scenes import make_scene
from caffast.models.source import SHIPPED_DEMO

ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^(?:\[rank (\d+)\] )?(.+?): (\d+)/(\d+) (\w+) \((\d+)%\), (\S+) \w+/s, (.+)$")


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _lines(text: str) -> list[tuple]:
    """The progress lines of `text` as (rank, label, done, total, unit, percent, ending)."""
    found = []
    for line in text.splitlines():
        match = LINE.match(line)
        if match:
            rank, label, done, total, unit, percent, _, ending = match.groups()
            found.append((rank, label, int(done), int(total), unit, int(percent), ending))
    return found


@pytest.fixture
def every_update(monkeypatch):
    """Off a terminal, a progress line at every update instead of every 10 s."""
    monkeypatch.setattr(common, "PROGRESS_LINE_SECONDS", 0.0)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """Three 64 x 64 scenes as PNG files: one batch."""
    root = tmp_path_factory.mktemp("scenes")
    for seed in range(3):
        pixels = (make_scene(seed).image.transpose(1, 2, 0) * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{seed}.png")
    return root


# the progress object


def test_lines_off_a_terminal_count_units_and_the_work_under_way(every_update, capsys):
    progress = Progress(10, "explaining")
    progress.update(0, 0.5)
    progress.update(3)
    progress.update(3, 2.0)
    progress.update(10)
    progress.update(10)  # after the end: nothing more
    lines = _lines(capsys.readouterr().err)
    assert [(done, total, percent) for _, _, done, total, _, percent, _ in lines] == [
        (0, 10, 5), (3, 10, 30), (3, 10, 50), (10, 10, 100)]  # fmt: skip
    assert lines[-1][-1].startswith("in 0:0") and all(line[0] is None for line in lines)


def test_lines_come_at_most_once_a_period(capsys):
    progress = Progress(100, "evaluating", unit="scenes")  # the period: 10 s
    for done in range(99):
        progress.update(done)
    progress.end()
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0][1:5] == ("evaluating", 98, 100, "scenes")  # only the closing line


def test_the_work_shown_never_goes_back(every_update, capsys):
    progress = Progress(4, "explaining")
    progress.update(0, 3.2)  # the solver is through most of a batch of four
    progress.update(1)  # its first image saved
    progress.end()
    assert [line[5] for line in _lines(capsys.readouterr().err)] == [80, 80, 80]


def test_a_bar_on_a_terminal(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    progress = Progress(4, "explaining")
    progress.update(2)
    progress.update(4)
    text = terminal.getvalue()
    frames = text.split("\r")[1:]
    assert len(frames) == 3 and text.endswith("\n") and text.count("\n") == 1
    bars = [re.search(r"\[([#.]+)\] (\d+)/4 images", frame) for frame in frames]
    width = len(bars[0].group(1))
    assert [bar.group(1).count("#") for bar in bars] == [0, width // 2, width]
    assert [int(bar.group(2)) for bar in bars] == [0, 2, 4] and "in 0:0" in frames[-1]


def test_a_message_starts_below_an_open_bar(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    progress = Progress(4, "explaining")
    progress.update(1)
    common.say("caffast: warning: something")
    assert "] 1/4 images" in terminal.getvalue().split("\n")[0]
    assert terminal.getvalue().split("\n")[1] == "caffast: warning: something"
    progress.end()


def test_ranks_write_lines_with_their_rank_even_on_a_terminal(monkeypatch, every_update):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    progress = Progress(3, "explaining", rank=1)
    progress.update(1)
    progress.update(3)
    lines = _lines(terminal.getvalue())
    assert "\r" not in terminal.getvalue()
    assert [(rank, done) for rank, _, done, *_ in lines] == [("1", 1), ("1", 3)]


def test_quiet_shows_nothing_and_a_delay_hides_quick_work(monkeypatch, every_update, capsys):
    monkeypatch.setattr(sys, "stderr", Terminal())
    for progress in (Progress(3, "x", quiet=True), Progress(3, "x", quiet=True, rank=0), Progress(3, "x", delay=60)):
        progress.update(1, 0.5)
        progress.update(3)
        progress.end()
    assert sys.stderr.getvalue() == ""
    hidden = Progress(3, "x", delay=60)
    hidden.update(1)
    hidden.end()
    assert sys.stderr.getvalue() == "" and capsys.readouterr().err == ""


# the solver's callback


def test_the_loop_reports_its_share_at_each_check_and_changes_nothing():
    model = SHIPPED_DEMO.load()
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    settings = dict(mode="specific", targets=[[0, 1]] * 3, max_iter=230, min_error=0.0, backend="torch")
    shares: list[float] = []
    heard = explain(model, images, "features", **settings, progress=shares.append)
    plain = explain(model, images, "features", **settings)
    assert torch.equal(heard.maps, plain.maps) and torch.equal(heard.iterations, plain.iterations)
    # checks after iterations 1, 51, 101, 151, 201; nothing stops (min_error 0), so the share is the iterations'
    assert shares == pytest.approx([k / 230 for k in (1, 51, 101, 151, 201)])


def test_a_stopped_problem_counts_as_done():
    assert work_done(100, 0, 4, 1000) == 1.0
    assert work_done(100, 1, 4, 1000) == pytest.approx(1 - 900 / 4000)
    assert work_done(1000, 4, 4, 1000) == 1.0


# the commands


def test_a_run_of_one_batch_moves_before_the_batch_ends(scenes, tmp_path, every_update, capsys):
    # the torch backend runs the shared loop on the demo's fused head, as every generic tail does
    code = main(["run", str(scenes), "--out", str(tmp_path / "out"), "--arch", "demo", "--backend", "torch",
                 "--max-iter", "400", "--min-error", "0"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr()
    lines = [line for line in _lines(printed.err) if line[1] == "explaining"]
    assert "3 images: 0 finished before, 3 to explain" in printed.err
    assert all(total == 3 and unit == "images" for _, _, _, total, unit, _, _ in lines)
    within = [percent for _, _, done, _, _, percent, _ in lines if done == 0 and 0 < percent < 100]
    assert len(within) >= 5 and within == sorted(within)  # a line per check, 8 checks in all
    done = [line[2] for line in lines]
    assert done == sorted(done) and lines[-1][2:4] == (3, 3) and lines[-1][-1].startswith("in ")
    assert "3 images done" in printed.out


def test_a_quiet_run_says_nothing_on_stderr(scenes, tmp_path, every_update, capsys):
    out = tmp_path / "out"
    assert main(["run", str(scenes), "--out", str(out), "--arch", "demo", "--max-iter", "50", "--quiet"]) == 0
    printed = capsys.readouterr()
    assert printed.err == "" and "3 images done" in printed.out


def test_a_run_on_a_terminal_draws_a_bar(scenes, tmp_path):
    """The command in a pseudo-terminal: the bar is redrawn in place and ends with its newline."""
    leader, follower = pty.openpty()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "caffast", "run", str(scenes), "--out", str(tmp_path / "out"), "--arch", "demo",
               "--backend", "torch", "--max-iter", "400", "--min-error", "0"]  # fmt: skip
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=follower, env=env)
    os.close(follower)
    received = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 120)
        if not ready:
            break
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the process ended and closed the terminal
            break
        if not chunk:
            break
        received += chunk
    os.close(leader)
    assert process.wait(timeout=120) == 0 and b"3 images done" in process.stdout.read()
    text = received.decode()
    frames = [frame for frame in re.split(r"[\r\n]+", text) if frame.startswith("explaining [")]
    assert len(frames) >= 2 and re.search(r"\] 3/3 images  \S+ images/s  in 0:\d\d", frames[-1])
    assert re.search(r"explaining \[#*\.+\] 0/3 images", text)


def test_explain_writes_its_maps_as_npz_equal_to_the_explanation(scenes, tmp_path, capsys):
    image = scenes / "0.png"
    out = tmp_path / "out"
    assert main(["explain", str(image), "--arch", "demo", "--classes", "1,3", "--max-iter", "120", "--out", str(out),
                 "--quiet"]) == 0  # fmt: skip
    printed = capsys.readouterr()
    assert printed.err == "" and "wrote 2 overlays, 0 GIFs and 1 .npz files of maps" in printed.out
    _, tensor = load_image(str(image), SHIPPED_DEMO.preprocessing())
    expected = explain(SHIPPED_DEMO.load(), tensor[None], "features", [1, 3], mode="specific", max_iter=120)
    with np.load(out / "0_l2caf_specific_demo.npz", allow_pickle=False) as saved:
        np.testing.assert_array_equal(saved["maps"], expected.maps[0].numpy())
        np.testing.assert_array_equal(saved["targets"], [1, 3])
        np.testing.assert_array_equal(saved["objective"], expected.objective[0].numpy())
        settings = json.loads(str(saved["settings"]))
    assert settings["image"] == str(image) and settings["arch"] == "demo" and settings["layer"] == "features"
    assert settings["explain"]["max_iter"] == 120 and settings["explain"]["targets"] == [1, 3]
    assert settings["explain"]["mode"] == "specific" and settings["explain"]["loss"] == "margin"


def test_a_class_is_named_once_in_a_file_name(scenes, tmp_path, capsys):
    from caffast.eval.demo_model import CLASS_NAMES

    out = tmp_path / "named"
    assert main(["explain", str(scenes / "1.png"), "--arch", "demo", "--classes", "2", "--max-iter", "10",
                 "--out", str(out)]) == 0  # fmt: skip
    assert (out / f"1_l2caf_2_{CLASS_NAMES[2].replace(' ', '_')}_demo.png").is_file()
    pytest.importorskip("timm")
    out = tmp_path / "unnamed"  # a timm model: its classes have no names here
    assert main(["explain", str(scenes / "1.png"), "--arch", "test_efficientnet", "--weights", "random",
                 "--classes", "207", "--max-iter", "10", "--out", str(out)]) == 0  # fmt: skip
    assert sorted(path.name for path in out.iterdir()) == [
        ".caffast-explain", "1_l2caf_207_test_efficientnet.png", "1_l2caf_specific_test_efficientnet.npz"]


def test_a_gif_shows_the_convergence_and_is_never_one_frame(scenes, tmp_path, capsys):
    out = tmp_path / "gd"
    assert main(["explain", str(scenes / "2.png"), "--arch", "demo", "--classes", "1", "--max-iter", "120",
                 "--min-error", "0", "--gif", "--out", str(out)]) == 0  # fmt: skip
    (gif,) = out.glob("*.gif")
    with Image.open(gif) as frames:
        shown = 0  # 300 ms a frame; Pillow merges a frame drawn like the one before into it, adding their times
        for index in range(frames.n_frames):
            frames.seek(index)
            shown += frames.info["duration"]
        last = np.asarray(frames.convert("RGB"))
    assert frames.n_frames >= 2 and shown == 300 * (math.ceil(120 / 50) + 1)  # iterations 1, 51, 101 and the end
    final = np.asarray(Image.open(gif.with_suffix(".png")).convert("RGB"))
    assert np.abs(last.astype(int) - final.astype(int)).mean() < 8  # the overlay's map, through the GIF's palette
    capsys.readouterr()
    out = tmp_path / "exact"  # the closed form: one map, no convergence
    assert main(["explain", str(scenes / "2.png"), "--arch", "demo", "--classes", "1", "--solver", "exact",
                 "--gif", "--out", str(out)]) == 0  # fmt: skip
    assert not list(out.glob("*.gif"))
    assert "no GIF for the maps of 1 images, which have one frame: solver exact" in capsys.readouterr().err


def test_evaluate_reports_scenes_and_batches_change_no_score(monkeypatch, every_update, capsys):
    whole = evaluate_scenes(12, max_iter=100)
    monkeypatch.setattr(localization, "SCENES_PER_BATCH", 5)
    assert evaluate_scenes(12, max_iter=100) == whole
    assert main(["evaluate", "--scenes", "12", "--max-iter", "100"]) == 0
    printed = capsys.readouterr()
    assert [line[2:5] for line in _lines(printed.err)] == [(5, 12, "scenes"), (10, 12, "scenes"), (12, 12, "scenes")]
    assert main(["evaluate", "--scenes", "12", "--max-iter", "100", "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_the_demo_counts_its_scene_and_the_scored_ones(tmp_path, every_update, capsys):
    assert main(["demo", "--out", str(tmp_path), "--scenes", "4", "--max-iter", "60"]) == 0
    lines = _lines(capsys.readouterr().err)
    done = [line[2] for line in lines]
    assert lines[-1][1:5] == ("demo", 5, 5, "scenes") and done == sorted(done)
