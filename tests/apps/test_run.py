"""`caffast run`: folder runs that resume after a kill, refuse mixed settings, split batches that do
not fit, record broken images, and give the same results under torchrun."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from caffast.apps import atomic, runfolder, runner
from caffast.apps.atomic import write_atomically, write_json
from caffast.apps.cli import main
from caffast.apps.runfolder import RunFolder
from caffast.eval.scenes import make_scene
from subprocesses import checkout_env, torchrun

SETTINGS = ["--arch", "demo", "--max-iter", "100"]
IMAGES = 12  # plus one broken file


def _run_args(data: Path, out: Path, *options: str) -> list[str]:
    return ["run", str(data), "--out", str(out), *SETTINGS, *options]


def _outputs(out: Path) -> tuple[list[dict], dict[str, dict[str, np.ndarray]]]:
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    arrays = {
        path.relative_to(out).as_posix(): dict(np.load(path)) for path in sorted((out / "results").rglob("*.npz"))
    }
    return index, arrays


def _assert_same_outputs(out: Path, expected: Path, atol: float = 0.0) -> None:
    """Same index rows and result files; integer arrays equal, float arrays equal or within atol."""
    index, arrays = _outputs(out)
    expected_index, expected_arrays = _outputs(expected)
    assert sorted(arrays) == sorted(expected_arrays)
    for name, values in arrays.items():
        for key, value in values.items():
            wanted = expected_arrays[name][key]
            assert value.dtype == wanted.dtype and value.shape == wanted.shape, (name, key)
            if value.dtype.kind == "f" and atol:
                np.testing.assert_allclose(value, wanted, rtol=0, atol=atol, err_msg=f"{name} {key}")
            else:
                np.testing.assert_array_equal(value, wanted, err_msg=f"{name} {key}")
    if atol:
        for row, wanted in zip(index, expected_index):
            for key in ("loss", "objective"):
                assert row.pop(key, 0.0) == pytest.approx(wanted.pop(key, 0.0), abs=atol)
    assert index == expected_index


def _save(scene_image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((scene_image.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Scenes as .png, .PNG, .bmp and .jpg in nested folders, a broken .png and a text file."""
    root = tmp_path_factory.mktemp("data")
    names = ["a.png", "b.PNG", "c.bmp", "d.jpg", "sub/e.png", "sub/f.png", "sub/deeper/g.png", "h.png",
             "i.png", "sub/j.png", "k.png", "l.png"]  # fmt: skip
    for seed, name in enumerate(names):
        _save(make_scene(seed, size=80 if seed % 4 == 0 else 64).image, root / name)
    (root / "sub" / "broken.png").write_bytes(b"this is not a picture")
    (root / "notes.txt").write_text("not an image")
    assert len(names) == IMAGES
    return root


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> Path:
    """An uninterrupted run, one image per batch, on one thread."""
    out = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_run_args(dataset, out, "--batch-size", "1")) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_every_image_has_a_result_and_the_broken_one_is_recorded(reference):
    index, arrays = _outputs(reference)
    assert len(index) == IMAGES + 1 and len(arrays) == IMAGES
    failed = [row for row in index if row["status"] == "failed"]
    assert [row["image"] for row in failed] == ["sub/broken.png"]
    assert "cannot read image" in failed[0]["error"] and "broken.png" in failed[0]["error"]
    images = [row["image"] for row in index]
    assert images == sorted(images) and "sub/deeper/g.png" in images and "b.PNG" in images
    row = next(row for row in index if row["image"] == "sub/e.png")
    assert row["status"] == "done" and row["result"] == "results/sub/e.png.npz" and row["iterations"] == 100
    result = arrays["results/sub/e.png.npz"]
    assert result["maps"].dtype == np.float32 and result["filters"].dtype == np.float32
    assert result["maps"].shape == (1, 8, 8) and result["targets"].tolist() == [row["target"]]
    assert float(result["loss"][0]) == row["loss"]
    config = json.loads((reference / "config.json").read_text())
    assert config["arch"] == "demo" and config["layer"] == "features" and config["explain"]["max_iter"] == 100


KILLED_AT_A_COMMIT = """
import os, signal, sys
from caffast.apps import runfolder, runner
from caffast.apps.cli import main
runner.COMMIT_SECONDS, runner.COMMIT_IMAGES = float("inf"), 3
commit, commits = runfolder.RunFolder.commit, []
def commit_or_die(self):
    commits.append(len(self.uncommitted))
    if len(commits) == 3:  # the files of three more images are written, their records not
        os.kill(os.getpid(), signal.SIGKILL)
    return commit(self)
runfolder.RunFolder.commit = commit_or_die
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_run_redoes_exactly_the_images_it_had_not_committed(dataset, reference, tmp_path):
    """Killed (SIGKILL) as it commits its third group of three images, after their files are written:
    the six committed images are skipped, untouched, by the rerun, the others are explained again, and
    the outputs are those of an uninterrupted run."""
    script = tmp_path / "killed.py"
    script.write_text(KILLED_AT_A_COMMIT)
    out = tmp_path / "out"
    command = [str(script), *_run_args(dataset, out, "--batch-size", "1")]
    killed = subprocess.run([sys.executable, *command], env=checkout_env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    finished = {path: path.stat().st_mtime_ns for path in out.glob("records/**/*.json")}
    assert len(finished) == 6
    results = {path: path.stat().st_mtime_ns for path in out.glob("results/**/*.npz")}
    recorded = {out / "results" / path.relative_to(out / "records").with_suffix(".npz") for path in finished}
    assert len(set(results) - recorded) >= 2  # written, not committed (one of the nine may be the broken image)
    stale = out / "results" / ".caffast-x1y2z3.tmp"  # what a kill during a write leaves
    stale.write_bytes(b"half a file")

    rerun = subprocess.run([sys.executable, "-m", "caffast", *_run_args(dataset, out, "--batch-size", "1")],
                           env=checkout_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert f"{IMAGES - 6} images done, 1 failed, 6 skipped" in rerun.stdout
    assert {path: path.stat().st_mtime_ns for path in finished} == finished  # records untouched
    for path, mtime in results.items():  # the committed images' results untouched, the others written again
        assert (path.stat().st_mtime_ns == mtime) == (path in recorded), path
    assert not stale.exists() and not list(out.rglob("*.tmp"))
    _assert_same_outputs(out, reference)


def test_records_are_written_only_once_the_files_they_name_are_durable(tmp_path, monkeypatch):
    """A record names files a crash of the machine cannot take away: its image's result and overlay
    are made durable before it is written, and it is written only by a commit."""
    folder = RunFolder(tmp_path / "out")
    synced, records = set(), []
    monkeypatch.setattr(runfolder, "make_durable", lambda paths: synced.update(paths))

    def write_record(path, record, durable=True):
        records.append(path)
        image = record["image"]
        assert {folder.result_path(image), folder.overlay_path(image, 1)} <= synced and path not in synced

    monkeypatch.setattr(runfolder, "write_json", write_record)
    for image in ("a.png", "sub/b.png"):
        folder.write_result(image, {"maps": np.zeros((1, 2, 2), np.float32)})
        folder.write_output(folder.overlay_path(image, 1), lambda file: file.write(b"png"))
        folder.write_record(image, [{"image": image, "status": "done"}])
    assert not records and not synced and len(folder.uncommitted) == 2
    rows = folder.commit()
    assert [row[0]["image"] for row in rows] == ["a.png", "sub/b.png"]
    assert records == [folder.record_path("a.png"), folder.record_path("sub/b.png")] and set(records) <= synced
    assert folder.commit() == [] and not folder.uncommitted and not folder.unsynced


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="names open files through /proc")
def test_without_syncfs_each_file_and_folder_is_fsynced_once(tmp_path, monkeypatch):
    """Where Linux's syncfs is missing, make_durable fsyncs each file and each folder that holds one."""
    files = [tmp_path / "a", tmp_path / "b", tmp_path / "sub" / "c"]
    for path in files:
        write_atomically(path, lambda file: file.write(b"x"), durable=False)
    synced, fsync = [], os.fsync
    monkeypatch.setattr(atomic, "SYNCFS", None)
    monkeypatch.setattr(os, "fsync", lambda descriptor: (synced.append(os.readlink(f"/proc/self/fd/{descriptor}")),
                                                         fsync(descriptor)))  # fmt: skip
    atomic.make_durable(files)
    assert sorted(synced) == sorted(map(str, [*files, tmp_path, tmp_path / "sub"]))


def test_other_settings_are_refused(dataset, reference, capsys):
    config = (reference / "config.json").read_text()
    for option, value, setting in (("--mode", "oblivious", "explain.mode"), ("--lr", "0.1", "explain.lr")):
        assert main(_run_args(dataset, reference, "--batch-size", "1", option, value)) == 2
        error = capsys.readouterr().err
        assert setting in error and "--out" in error and str(reference) in error
    assert (reference / "config.json").read_text() == config
    # batch size, device and backend do not change results: the same folder takes them
    assert main(_run_args(dataset, reference, "--batch-size", "4", "--backend", "torch")) == 0
    assert f"{IMAGES + 1} skipped" in capsys.readouterr().out


def test_a_folder_of_an_older_caffast_resumes_with_the_loss_it_ran(dataset, tmp_path, capsys):
    """config.json files written before the class-specific loss was a setting hold no explain.loss:
    those runs used the release's loss, so the folder takes --loss release and refuses the default."""
    out = tmp_path / "older"
    few = tmp_path / "few"
    few.mkdir()
    shutil.copy(dataset / "a.png", few / "a.png")
    assert main(_run_args(few, out, "--loss", "release")) == 0
    config = json.loads((out / "config.json").read_text())
    del config["explain"]["loss"]
    (out / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(_run_args(few, out)) == 2
    assert "explain.loss 'release' there, 'margin' now" in capsys.readouterr().err
    assert main(_run_args(few, out, "--loss", "release")) == 0
    assert "1 skipped" in capsys.readouterr().out


def _failing_for_large_batches(monkeypatch, largest: int) -> list[int]:
    """Make the runner's explain raise out-of-memory for batches above `largest`; returns the sizes seen."""
    sizes = []
    explain = runner.explain
    error = getattr(torch, "OutOfMemoryError", RuntimeError)

    def explain_or_run_out(model, images, *args, **kwargs):
        sizes.append(images.shape[0])
        if images.shape[0] > largest:
            raise error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return explain(model, images, *args, **kwargs)

    monkeypatch.setattr(runner, "explain", explain_or_run_out)
    return sizes


def test_batches_that_do_not_fit_are_split(dataset, tmp_path, monkeypatch, capsys):
    whole = tmp_path / "whole"
    assert main(_run_args(dataset, whole, "--batch-size", "8")) == 0
    sizes = _failing_for_large_batches(monkeypatch, largest=2)
    split = tmp_path / "split"
    capsys.readouterr()
    assert main(_run_args(dataset, split, "--batch-size", "8")) == 0
    assert max(sizes[1:]) > 2 and sizes[-1] <= 2  # it tried the big batch, then kept to what fitted
    said = capsys.readouterr().err
    assert "out of memory with a batch of 8 images: going on with batches of 4" in said
    assert "out of memory with a batch of 4 images: going on with batches of 2" in said
    _assert_same_outputs(split, whole, atol=1e-6)  # other batch compositions round differently


def test_a_batch_split_again_later_loses_no_image(dataset, tmp_path, monkeypatch, capsys):
    """Batches of 8 that fit as 4 at first and as 2 later: the second batch, already cut in parts of
    4, is cut again, and every one of its images is still explained."""
    data = tmp_path / "data"
    for copy in range(2):
        for path in sorted(dataset.rglob("*.png"))[:8]:
            (data / str(copy)).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, data / str(copy) / path.name)
    explain = runner.explain
    explained = []

    def explain_or_run_out(model, images, *args, **kwargs):
        if images.shape[0] > (4 if len(explained) < 7 else 2):  # the first batch has 7 readable images
            raise getattr(torch, "OutOfMemoryError", RuntimeError)("CUDA out of memory")
        explanation = explain(model, images, *args, **kwargs)
        explained.extend([None] * images.shape[0])
        return explanation

    monkeypatch.setattr(runner, "explain", explain_or_run_out)
    monkeypatch.setattr(runner.Runner, "check_settings", lambda self: None)
    out = tmp_path / "out"
    assert main(_run_args(data, out, "--batch-size", "8")) == 0
    assert "14 images done, 2 failed" in capsys.readouterr().out  # each copy has the broken file
    assert len(list(out.glob("records/**/*.json"))) == 16


def test_an_image_that_never_fits_fails_and_is_retried_on_request(dataset, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    _failing_for_large_batches(monkeypatch, largest=0)
    monkeypatch.setattr(runner.Runner, "check_settings", lambda self: None)
    assert main(_run_args(dataset, out, "--batch-size", "4", "--max-iter", "2")) == 0
    index, _ = _outputs(out)
    assert {row["status"] for row in index} == {"failed"}
    assert all("out of memory" in row["error"] for row in index if row["image"] != "sub/broken.png")
    assert f"0 images done, {IMAGES + 1} failed" in capsys.readouterr().out
    monkeypatch.undo()
    assert main(_run_args(dataset, out, "--batch-size", "4", "--max-iter", "2")) == 0  # failed counts as finished
    assert f"{IMAGES + 1} skipped" in capsys.readouterr().out
    assert main(_run_args(dataset, out, "--batch-size", "4", "--max-iter", "2", "--retry-failed")) == 0
    assert f"{IMAGES} images done, 1 failed, 0 skipped" in capsys.readouterr().out
    index, _ = _outputs(out)
    assert [row["image"] for row in index if row["status"] == "failed"] == ["sub/broken.png"]


def test_out_of_memory_errors_are_recognised():
    assert runner.is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert runner.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate"))
    if hasattr(torch, "OutOfMemoryError"):
        assert runner.is_out_of_memory(torch.OutOfMemoryError("no more"))
    assert not runner.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not runner.is_out_of_memory(ValueError("out of memory"))


def test_torchrun_on_two_processes_equals_one(dataset, reference, tmp_path):
    out = tmp_path / "out"
    command = torchrun("-m", "caffast", *_run_args(dataset, out, "--batch-size", "1"))
    result = subprocess.run(command, env=checkout_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{IMAGES} images done, 1 failed, 0 skipped" in result.stdout
    _assert_same_outputs(out, reference)
    # each rank closes its own progress line: of the IMAGES + 1 one-image batches, rank 0 takes the 1st, 3rd, ...
    first, second = (IMAGES + 2) // 2, (IMAGES + 1) // 2
    closing = re.findall(r"^\[rank (\d)\] explaining: (\d+)/(\d+) images \(100%\)", result.stderr, re.MULTILINE)
    assert sorted(closing) == [("0", str(first), str(first)), ("1", str(second), str(second))]


def test_a_rank_that_stops_stops_the_run_without_a_hang(dataset, tmp_path):
    """Rank 1 cannot write its image's result (a file stands where its folder goes): it stops with
    that message, and rank 0 learns of it instead of waiting."""
    data = tmp_path / "data"
    data.mkdir()
    picture = next(dataset.rglob("*.png")).read_bytes()
    (data / "a.png").write_bytes(picture)
    out = tmp_path / "out"
    assert main(_run_args(data, out, "--batch-size", "1")) == 0  # the folder is a run folder now
    for name in ("b.png", "z/c.png"):
        (data / name).parent.mkdir(exist_ok=True)
        (data / name).write_bytes(picture)
    (out / "results" / "z").write_text("in the way")
    command = torchrun("-m", "caffast", *_run_args(data, out, "--batch-size", "1"))
    result = subprocess.run(command, env=checkout_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"cannot write {out / 'results' / 'z'} (File exists)" in result.stderr
    assert "move away the file that stands where a folder goes" in result.stderr
    assert "of the 2 processes stopped on an error" in result.stderr


def test_bfloat16_model_gives_float32_results_close_to_float32(dataset, reference, tmp_path):
    out = tmp_path / "out"
    assert main(_run_args(dataset, out, "--dtype", "bfloat16")) == 0
    _, arrays = _outputs(out)
    _, expected = _outputs(reference)
    compared = 0
    for name, values in arrays.items():
        assert values["maps"].dtype == values["filters"].dtype == values["loss"].dtype == np.float32
        if np.array_equal(values["targets"], expected[name]["targets"]):  # the same top-1 class
            np.testing.assert_allclose(values["maps"], expected[name]["maps"], rtol=0, atol=0.05)
            compared += 1
    assert compared >= len(arrays) - 1, f"bfloat16 changed the top-1 class of {len(arrays) - compared} images"


def test_torchvision_model_with_random_weights_and_overlays(tmp_path):
    data = tmp_path / "photos"
    data.mkdir()
    for seed in range(2):
        pixels = np.random.default_rng(seed).integers(0, 255, size=(240, 300, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(data / f"photo{seed}.jpg")
    out = tmp_path / "out"
    argv = ["run", str(data), "--out", str(out), "--arch", "resnet18", "--weights", "random", "--max-iter", "5",
            "--classes", "3,7", "--overlays"]  # fmt: skip
    assert main(argv) == 0
    index, arrays = _outputs(out)
    assert [(row["image"], row["target"]) for row in index] == [(f"photo{s}.jpg", k) for s in range(2) for k in (3, 7)]
    assert arrays["results/photo0.jpg.npz"]["maps"].shape == (2, 7, 7)
    for row in index:
        assert Image.open(out / row["overlay"]).size == (224, 224)
    config = json.loads((out / "config.json").read_text())
    assert config["layer"] == "layer4" and config["input"]["size"] == 224 and config["explain"]["targets"] == [3, 7]


@pytest.mark.parametrize("folder,message", [("missing", "does not exist"), ("empty", "no images")])
def test_data_folder_errors(folder, message, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["run", str(tmp_path / folder), "--out", str(tmp_path / "out"), "--arch", "demo"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_output_folder_is_checked_before_use(dataset, tmp_path):
    """The data folder itself, a folder of other files and a folder whose settings are unreadable
    are refused; nothing in them is touched."""
    assert main(_run_args(dataset, dataset)) == 2
    foreign = tmp_path / "foreign"
    keep = foreign / "notes" / ".draft.tmp"
    keep.parent.mkdir(parents=True)
    keep.write_text("mine")
    assert main(_run_args(dataset, foreign)) == 2 and keep.read_text() == "mine"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert main(_run_args(dataset, broken)) == 2


def test_a_long_image_name_is_explained(dataset, tmp_path):
    data = tmp_path / "long"
    data.mkdir()
    name = "x" * 230 + ".png"
    (data / name).write_bytes(next(dataset.rglob("*.png")).read_bytes())
    out = tmp_path / "out"
    assert main(_run_args(data, out)) == 0
    (row,) = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert row["image"] == name and row["status"] == "done"


def test_exact_solver_and_positive_maps_in_a_run(dataset, reference, tmp_path):
    """--solver and --map reach every image: the objectives are at most the reference loop's, the
    maps are the positive part of the filters, and the settings are part of the configuration."""
    out = tmp_path / "out"
    assert main(_run_args(dataset, out, "--solver", "exact", "--map", "positive")) == 0
    _, arrays = _outputs(out)
    _, expected = _outputs(reference)
    assert sorted(arrays) == sorted(expected)
    for name, values in arrays.items():
        assert (values["objective"] <= expected[name]["objective"] + 1e-6).all(), name
        kept = np.clip(values["filters"], 0, None)
        norms = np.linalg.norm(kept.reshape(len(kept), -1), axis=1)[:, None, None]
        np.testing.assert_allclose(values["maps"], kept / norms, atol=1e-6)
    assert main(_run_args(dataset, out, "--map", "abs")) == 2  # another map into the same folder is refused


def _holder(out: Path, seconds: float) -> subprocess.Popen:
    """Another process that holds the output folder's lock for `seconds`, once it printed 'locked'."""
    code = (f"import time; from pathlib import Path; from caffast.apps.runfolder import RunFolder\n"
            f"with RunFolder(Path({str(out)!r})).locked(False):\n    print('locked', flush=True); time.sleep({seconds})\n"
            "print('released', flush=True)")
    process = subprocess.Popen([sys.executable, "-c", code], env=checkout_env(), stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_run_on_the_folder_is_refused_or_waits(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    holder = _holder(out, 60)
    try:
        assert main(_run_args(dataset, out)) == 2
        error = capsys.readouterr().err
        assert f"in use by another caffast run (pid {holder.pid} on" in error and "--wait" in error
        assert error.count("\n") == 1 and not (out / "config.json").exists()  # nothing touched
    finally:
        holder.kill()
        holder.wait()
    holder = _holder(out, 2)
    try:
        assert main(_run_args(dataset, out, "--wait")) == 0
        assert f"waiting for the other caffast run using {out} (pid {holder.pid}" in capsys.readouterr().err
        assert holder.stdout.readline().strip() == "released"  # it had let go before this run began
    finally:
        holder.kill()
        holder.wait()
    _assert_same_outputs(out, out)  # a whole index


def test_missing_and_broken_outputs_are_redone(dataset, reference, tmp_path, capsys):
    """A deleted record, a record replaced with garbage and a deleted result file: the rerun says
    so, explains exactly those three images again, and ends with the whole index."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "records" / "a.png.json").unlink()
    (out / "records" / "sub" / "e.png.json").write_text("garbage")
    (out / "results" / "sub" / "deeper" / "g.png.npz").unlink()
    (out / "results" / "h.png.npz").write_bytes((out / "results" / "h.png.npz").read_bytes()[:100])  # truncated
    untouched = {path: path.stat().st_mtime_ns for path in out.glob("records/**/*.json")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the reference ran
    try:
        assert main(_run_args(dataset, out, "--batch-size", "1")) == 0
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    assert "3 images had broken outputs or changed, and are explained again: " in captured.err
    for image, problem in (("h.png", "does not load"), ("sub/deeper/g.png", "results/sub/deeper/g.png.npz is missing"),
                           ("sub/e.png", "records/sub/e.png.json cannot be read")):  # fmt: skip
        assert f"{image} (its " in captured.err and problem in captured.err
    assert f"4 images done, 0 failed, {IMAGES + 1 - 4} skipped" in captured.out
    redone = {out / "records" / name for name in ("a.png.json", "sub/e.png.json", "sub/deeper/g.png.json",
                                                  "h.png.json")}
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in untouched.items() if path not in redone)
    _assert_same_outputs(out, reference)


@pytest.mark.parametrize(
    "option,value,message",
    [("--max-iter", "0", "--max-iter must be at least 1, got 0"), ("--lr", "0", "--lr must be a finite positive number"),
     ("--lr", "nan", "--lr must be a finite positive number"), ("--min-error", "-1", "--min-error must be zero or"),
     ("--batch-size", "0", "--batch-size must be at least 1"), ("--classes", "2,2", "name 2 more than once"),
     ("--classes", "-1", "indices from 0 on"), ("--classes", "6", "targets must be class indices in [0, 6)"),
     ("--rank-timeout", "0", "--rank-timeout must be"), ("--device", "cuda:99", "--device cuda:99")],
)  # fmt: skip
def test_settings_are_checked_before_the_folder_is_touched(option, value, message, dataset, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_run_args(dataset, out, option, value)) == 2
    error = capsys.readouterr().err
    assert error.startswith("caffast: error: ") and error.count("\n") == 1 and message in error, error
    assert not out.exists()


def test_a_resumed_run_writes_the_bytes_of_an_uninterrupted_one(dataset, tmp_path, monkeypatch):
    """Batches of 4 on the generic path (where the batch composition changes the rounding): stopped
    after the second image of the second batch, the rerun computes that batch whole again, and every
    file it writes equals the uninterrupted run's byte for byte."""
    settings = ("--batch-size", "4", "--layer", "features.11")
    whole = tmp_path / "whole"
    assert main(_run_args(dataset, whole, *settings)) == 0
    out = tmp_path / "out"
    write_record = RunFolder.write_record
    calls = []

    def stopping(self, image, rows, source):
        calls.append(image)
        if len(calls) == 6:
            raise runner.Stop(signal.SIGINT)
        write_record(self, image, rows, source)

    monkeypatch.setattr(RunFolder, "write_record", stopping)
    assert main(_run_args(dataset, out, *settings)) == 130
    assert len(list(out.glob("records/**/*.json"))) == 5
    monkeypatch.undo()
    assert main(_run_args(dataset, out, *settings)) == 0
    files = sorted(path.relative_to(whole) for path in whole.rglob("*") if path.is_file() and path.name != ".lock")
    assert files == sorted(path.relative_to(out) for path in out.rglob("*") if path.is_file() and path.name != ".lock")
    for name in files:
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name


def test_outputs_get_the_permissions_of_the_umask(dataset, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes((dataset / "a.png").read_bytes())
    previous = os.umask(0o027)
    try:
        assert main(_run_args(data, tmp_path / "out", "--overlays")) == 0
        write_atomically(tmp_path / "single", lambda file: file.write(b"x"))
    finally:
        os.umask(previous)
    written = [path for path in (tmp_path / "out").rglob("*") if path.is_file() and path.name != ".lock"]
    assert len(written) == 5  # config, result, overlay, record, index
    assert {oct(path.stat().st_mode & 0o777) for path in [*written, tmp_path / "single"]} == {"0o640"}


def test_a_full_disk_says_so_and_where(dataset, tmp_path, monkeypatch, capsys):
    def no_space(path, arrays, durable=True):
        def write(file):
            raise OSError(errno.ENOSPC, "No space left on device")

        write_atomically(path, write, durable)

    monkeypatch.setattr(runfolder, "write_npz", no_space)
    out = tmp_path / "out"
    assert main(_run_args(dataset, out, "--batch-size", "1")) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("caffast: error: the disk is full: cannot write ") and "rename" not in error
    assert str(out / "results" / "a.png.npz") in error and "run the same command again" in error
    assert not list(out.glob("records/**/*.json"))  # nothing recorded failed: a rerun does it


@pytest.mark.parametrize("number", [errno.EROFS, errno.EACCES])
def test_an_unwritable_output_folder_stops_the_run_and_blames_no_image(number, dataset, tmp_path, monkeypatch, capsys):
    """A read-only or forbidden results folder fails every image alike: the run stops, nothing is
    recorded as failed, and once the storage is fixed the same command explains every image."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.png", "c.bmp"):
        shutil.copy(dataset / name, data / name)

    def refused(path, arrays, durable=True):
        raise OSError(number, os.strerror(number), str(path))

    monkeypatch.setattr(runfolder, "write_npz", refused)
    out = tmp_path / "out"
    assert main(_run_args(data, out, "--max-iter", "2")) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"caffast: error: cannot write {out / 'results' / 'a.png.npz'} ({os.strerror(number)})")
    assert "run the same command again to finish" in error
    assert not list(out.glob("records/**/*"))
    monkeypatch.undo()
    assert main(_run_args(data, out, "--max-iter", "2")) == 0
    assert [(row["image"], row["status"]) for row in _outputs(out)[0]] == [("a.png", "done"), ("c.bmp", "done")]


def test_image_names_up_to_the_longest_get_outputs_that_fit(dataset, tmp_path, capsys):
    """Names of 251 to 255 bytes (the longest a file system takes) pass 255 with ".json" or an overlay's
    suffix; two such names that differ only at their end keep their own outputs."""
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    names = [f"{'x' * (length - 4)}.png" for length in range(251, 256)] + ["sub/" + "é" * 124 + "ab.png"]
    names.append(names[0][:-5] + "y.png")
    sources = sorted(dataset.glob("*.png"))
    for k, name in enumerate(names):
        shutil.copy(sources[k % len(sources)], data / name)
    out = tmp_path / "out"
    assert main(_run_args(data, out, "--max-iter", "2", "--overlays")) == 0
    rows = _outputs(out)[0]
    assert sorted(row["image"] for row in rows) == sorted(names)
    assert all(row["status"] == "done" for row in rows)
    _, arrays = _outputs(out)
    alone = tmp_path / "alone"  # each image explained by itself, under a short name: the oracle
    for k, name in enumerate(sorted(names)):
        (alone / "data").mkdir(parents=True, exist_ok=True)
        shutil.copy(data / name, alone / "data" / f"{k}.png")
    assert main(_run_args(alone / "data", alone / "out", "--max-iter", "2")) == 0
    expected = _outputs(alone / "out")[1]
    for k, row in enumerate(sorted(rows, key=lambda row: row["image"])):
        np.testing.assert_array_equal(arrays[row["result"]]["maps"], expected[f"results/{k}.png.npz"]["maps"])
    capsys.readouterr()
    assert main(_run_args(data, out, "--max-iter", "2", "--overlays")) == 0
    assert "0 images done, 0 failed, 7 skipped" in capsys.readouterr().out



@pytest.mark.parametrize("number,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_run_cleanly(number, code, dataset, tmp_path):
    data = tmp_path / "data"
    for copy in range(4):
        shutil.copytree(dataset, data / str(copy))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "caffast", *_run_args(data, out, "--batch-size", "1")]
    process = subprocess.Popen(command, env=checkout_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(list(out.glob("records/**/*.json"))) < 2:
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(number)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code, err[-3000:]
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"caffast: interrupted by {signal.Signals(number).name} after ")
    done, failed = map(int, re.search(r"(\d+) images done, (\d+) failed", line).groups())
    assert done + failed == len(list(out.glob("records/**/*.json")))  # committed on the way out, and counted
    assert "left" in line and "run the same command again" in line
    assert not list(out.rglob("*.tmp"))


HANGING_RANK = """
import sys, time
from caffast.apps import runner
from caffast.apps.cli import main
explain_batch = runner.Runner.explain_batch
def hang_on_rank_1(self, names, unfinished):
    import torch.distributed as dist
    if dist.get_rank() == 1:
        time.sleep(120)
    explain_batch(self, names, unfinished)
runner.Runner.explain_batch = hang_on_rank_1
sys.exit(main(sys.argv[1:]))
"""


def test_a_rank_that_hangs_is_named_instead_of_waited_for(dataset, tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(HANGING_RANK)
    command = torchrun(str(script), *_run_args(dataset, tmp_path / "out", "--batch-size", "1", "--rank-timeout", "3"))
    started = time.monotonic()
    result = subprocess.run(command, env=checkout_env(), capture_output=True, text=True, timeout=110)
    assert result.returncode != 0 and time.monotonic() - started < 100
    named = "caffast: error: rank 0: rank 1 did not answer at the end of a batch within --rank-timeout 3 s"
    assert named in result.stderr


def test_the_outputs_of_earlier_runs_inside_the_data_are_not_explained(dataset, tmp_path, capsys):
    """photos/maps1 of an earlier run with --overlays is left out of a run into photos/maps2, as are an
    earlier run folder whose config.json was lost and the overlays of caffast explain; a run folder as
    the data folder is refused."""
    data = tmp_path / "photos"
    shutil.copytree(dataset, data)
    assert main(_run_args(data, tmp_path / "alone", "--max-iter", "2")) == 0  # outside the data: the oracle
    expected = sorted(row["image"] for row in _outputs(tmp_path / "alone")[0])
    assert main(_run_args(data, data / "maps1", "--overlays", "--max-iter", "2")) == 0
    assert list((data / "maps1" / "overlays").rglob("*.png"))
    shutil.copytree(data / "maps1", data / "old" / "lost")
    (data / "old" / "lost" / "config.json").unlink()
    photo = next(data.glob("*.png"))
    explain = ["explain", str(photo), "--arch", "shufflenet_v2_x0_5", "--layer", "conv5", "--weights", "random",
               "--max-iter", "1", "--out", str(data / "explained")]  # fmt: skip
    assert main(explain) == 0 and list((data / "explained").glob("*.png"))
    capsys.readouterr()
    assert main(_run_args(data, data / "maps2", "--max-iter", "2")) == 0
    assert "left out 3 caffast output folders" in capsys.readouterr().err
    assert sorted(row["image"] for row in _outputs(data / "maps2")[0]) == expected
    assert main(_run_args(data / "maps1", tmp_path / "maps3")) == 2
    assert "holds the outputs of a caffast run" in capsys.readouterr().err



def test_an_image_that_killed_the_process_twice_while_it_was_read_fails(dataset, tmp_path, monkeypatch):
    """While an image is decoded and resized it is marked; a process killed there (out of memory)
    leaves the mark.  One kill may be a kill -9 and the image is read again; after two it fails at
    once instead of killing every rerun, and --retry-failed reads it again."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.png", "b.png"):
        shutil.copy(dataset / "a.png", data / name)
    out = tmp_path / "out"
    folder = RunFolder(out)
    marks, read = {}, runner.read_input

    def read_and_look(path, *options):
        name = Path(path).name
        marks[name] = folder.killed_reads(name)
        return read(path, *options)

    monkeypatch.setattr(runner, "read_input", read_and_look)
    assert main(_run_args(data, out, "--max-iter", "2")) == 0
    assert marks == {"a.png": 1, "b.png": 1} and not list(out.rglob("*.reading")) and not list(out.rglob("*.tmp"))
    for kills, status in ((1, "done"), (2, "failed")):
        shutil.rmtree(out / "records")  # as a process killed while it read both images leaves the folder
        for name in ("a.png", "b.png"):
            write_json(folder.reading_path(name), {"image": name, "attempts": kills})
        marks.clear()
        assert main(_run_args(data, out, "--max-iter", "2")) == 0
        assert sorted(marks) == ([] if kills == 2 else ["a.png", "b.png"])
        rows = _outputs(out)[0]
        assert [row["status"] for row in rows] == [status] * 2
    assert "killed 2 times while it read and resized image 'a.png'" in rows[0]["error"]
    assert main(_run_args(data, out, "--max-iter", "2", "--retry-failed")) == 0
    assert [row["status"] for row in _outputs(out)[0]] == ["done"] * 2


def test_a_replaced_image_is_explained_again_and_a_touched_one_is_not(dataset, tmp_path, capsys):
    """Records keep what each image file was: a file replaced since (even by one of the same size) is
    explained again, a broken image fixed since too; a file only touched is skipped."""
    data = tmp_path / "data"
    data.mkdir()
    for source, name in (("c.bmp", "a.bmp"), ("h.png", "b.png"), ("i.png", "c.png")):
        shutil.copy(dataset / source, data / name)
    (data / "broken.png").write_bytes(b"not yet a picture")
    out = tmp_path / "out"
    assert main(_run_args(data, out, "--max-iter", "2")) == 0
    before = {row["image"]: row for row in _outputs(out)[0]}
    assert before["broken.png"]["status"] == "failed"
    same_size = bytearray((data / "a.bmp").read_bytes())
    same_size[-20] ^= 0xFF  # one pixel's byte: another picture in a file of the same size
    (data / "a.bmp").write_bytes(bytes(same_size))
    shutil.copy(dataset / "d.jpg", data / "broken.png")  # fixed: now a picture
    os.utime(data / "b.png", ns=(10**18, 10**18))  # touched, the same content
    capsys.readouterr()
    assert main(_run_args(data, out, "--max-iter", "2")) == 0
    captured = capsys.readouterr()
    assert "2 images had broken outputs or changed, and are explained again: a.bmp (the image file changed" in captured.err
    assert "2 images done, 0 failed, 2 skipped" in captured.out
    after = {row["image"]: row for row in _outputs(out)[0]}
    assert after["broken.png"]["status"] == "done" and after["b.png"] == before["b.png"]


def test_named_weights_record_where_they_come_from(tmp_path):
    """"DEFAULT" names what the installed library ships; a folder records the file it resolved to, so a
    library that changed its meaning does not mix two sets of weights into one run."""
    import torchvision

    from caffast.apps.runfolder import ConfigMismatch
    from caffast.models.zoo import weights_source

    assert weights_source("resnet50", "DEFAULT") == torchvision.models.ResNet50_Weights.DEFAULT.url
    assert weights_source("resnet50", "IMAGENET1K_V1") == torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    assert weights_source("resnet50", "random") is None
    config = {"arch": "resnet50", "weights": "DEFAULT", "weights_source": weights_source("resnet50", "DEFAULT"),
              "explain": {"mode": "specific", "loss": "margin"}}  # fmt: skip
    folder = RunFolder(tmp_path / "out")
    folder.claim(config)
    older_library = {**config, "weights_source": weights_source("resnet50", "IMAGENET1K_V1")}
    with pytest.raises(ConfigMismatch, match="weights_source"):
        folder.claim(older_library)
    # a folder written before the source was recorded cannot tell: it resumes
    stored = {key: value for key, value in config.items() if key != "weights_source"}
    (tmp_path / "out" / "config.json").write_text(json.dumps(stored))
    folder.claim(older_library)


def test_outputs_past_the_longest_path_the_system_opens_stop_the_run_with_the_fix(dataset, tmp_path, capsys):
    """An image deep in the data folder whose outputs, under a longer --out, pass the system's
    longest path: the run stops with the fix and records nothing, rather than an OSError."""
    folder = tmp_path / "data" / "/".join("f" * 200 for _ in range(19))
    folder.mkdir(parents=True)
    shutil.copy(dataset / "a.png", folder / "a.png")
    out = tmp_path / ("o" * 250) / ("o" * 250)
    assert main(_run_args(tmp_path / "data", out, "--max-iter", "2")) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("caffast: error: cannot write the outputs of an image: the path ")
    assert "the system opens paths of at most 4095 bytes: choose a shorter output folder (--out)" in error
    assert not list(out.glob("records/**/*.json"))


def test_images_whose_outputs_would_be_one_file_are_refused_by_name(dataset, tmp_path, monkeypatch, capsys):
    """x.png beside a folder x.png.npz/ (whose outputs need results/x.png.npz as a folder), and
    Dog.png beside dog.png where the output disk ignores letter case: the run says which, before
    any image is explained, instead of one image's outputs taking the other's place."""
    data = tmp_path / "data"
    (data / "x.png.npz").mkdir(parents=True)
    shutil.copy(dataset / "a.png", data / "x.png")
    shutil.copy(dataset / "a.png", data / "x.png.npz" / "y.png")
    assert main(_run_args(data, tmp_path / "out", "--max-iter", "2")) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "images 'x.png' and 'x.png.npz/y.png' would both write" in error and "results/x.png.npz" in error
    assert "rename one of them" in error and not list((tmp_path / "out").glob("results/**/*.npz"))

    cased = tmp_path / "cased"
    cased.mkdir()
    shutil.copy(dataset / "a.png", cased / "Dog.png")
    shutil.copy(dataset / "c.bmp", cased / "dog.png")
    monkeypatch.setattr(RunFolder, "folds_case", lambda self: True)
    assert main(_run_args(cased, tmp_path / "folded", "--max-iter", "2")) == 2
    assert "images 'Dog.png' and 'dog.png' would both write" in capsys.readouterr().err
    monkeypatch.setattr(RunFolder, "folds_case", lambda self: False)  # a disk that tells them apart
    assert main(_run_args(cased, tmp_path / "apart", "--max-iter", "2")) == 0
    assert sorted(row["image"] for row in _outputs(tmp_path / "apart")[0]) == ["Dog.png", "dog.png"]


def test_a_case_sensitive_output_folder_is_told_apart_from_one_that_is_not(tmp_path):
    folder = RunFolder(tmp_path)
    assert folder.folds_case() is False and not list(tmp_path.iterdir())
