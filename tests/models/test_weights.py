"""torchvision weights: downloaded into torch.hub's cache when missing (here from a local HTTP server),
read from the cache when there, and a clear message when they cannot be downloaded."""

import functools
import hashlib
import os
import http.server
import re
import shutil
import socket
import threading
import time

import pytest
import torch
import torchvision
from PIL import Image
from torchvision.models import Weights, WeightsEnum

import caffast
from caffast.apps.cli import main
from caffast.models import zoo


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/served; yields its base URL."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home / "hub" / "checkpoints"


def serve_state(root, state, stem):
    """Save `state` under torchvision's naming (stem-<sha256 prefix>.pth); returns the file name."""
    staging = root / "staging.pth"
    torch.save(state, staging)
    name = f"{stem}-{hashlib.sha256(staging.read_bytes()).hexdigest()[:8]}.pth"
    staging.rename(root / name)
    return name


def weights_at(url):
    class LocalWeights(WeightsEnum):
        IMAGENET1K_V1 = Weights(url=url, transforms=None, meta={})

    return LocalWeights.IMAGENET1K_V1


def closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_missing_weights_are_downloaded_into_the_cache_then_read_from_it(server, cache, capfd):
    base, root = server
    state = torch.nn.Linear(3, 2).state_dict()
    name = serve_state(root, state, "tiny")
    weights = weights_at(f"{base}/{name}")
    loaded = zoo.load_state_dict("resnet18", weights)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert (cache / name).is_file()
    # torch.hub's progress bar: tqdm prints "100%", its own fallback "100.0%"
    assert re.search(r"100(\.0)?%", capfd.readouterr().err)
    (root / name).unlink()  # from now on only the cache has it
    again = zoo.load_state_dict("resnet18", weights)
    assert all(torch.equal(again[k], state[k]) for k in state)


def test_a_file_copied_into_the_cache_is_used_offline(tmp_path, cache):
    state = torch.nn.Linear(4, 1).state_dict()
    name = serve_state(tmp_path, state, "copied")
    cache.mkdir(parents=True)
    shutil.copy(tmp_path / name, cache / name)
    loaded = zoo.load_state_dict("resnet18", weights_at(f"http://127.0.0.1:{closed_port()}/{name}"))
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_offline_names_the_cache_path_and_the_way_out(cache):
    weights = weights_at(f"http://127.0.0.1:{closed_port()}/gone-0123abcd.pth")
    with pytest.raises(FileNotFoundError) as error:
        zoo.load_state_dict("resnet18", weights)
    message = str(error.value)
    assert "cannot download" in message and "(offline?)" in message and "--weights FILE" in message
    assert str(cache / "gone-0123abcd.pth") in message
    assert not list(cache.glob("*"))  # nothing half-written is left behind


def test_the_release_weights_are_the_default(cache, monkeypatch, tmp_path):
    """load_architecture and the class_* commands ask for IMAGENET1K_V1, as pretrained=True does."""
    asked = []
    dead = f"http://127.0.0.1:{closed_port()}/w-0123abcd.pth"
    monkeypatch.setattr(zoo, "_weights_enum", lambda arch, name: asked.append((arch, name)) or weights_at(dead))
    with pytest.raises(FileNotFoundError, match="cannot download"):
        caffast.load_architecture("resnet50")
    assert asked == [("resnet50", "IMAGENET1K_V1")]
    image = tmp_path / "photo.png"
    Image.new("RGB", (32, 32)).save(image)
    assert main(["class_oblivious", "--input_img", str(image), "--arch", "googlenet"]) == 2
    assert asked[-1] == ("googlenet", "IMAGENET1K_V1")


def test_class_oblivious_downloads_the_weights_it_needs(server, cache, monkeypatch, tmp_path, capsys):
    base, root = server
    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x0_5()
    name = serve_state(root, model.state_dict(), "shufflenet")
    monkeypatch.setattr(zoo, "_weights_enum", lambda arch, weights_name: weights_at(f"{base}/{name}"))
    image = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), (120, 30, 200)).save(image)
    out = tmp_path / "out"
    argv = ["class_oblivious", "--input_img", str(image), "--arch", "shufflenet_v2_x0_5", "--max_iter", "3",
            "--output_dir", str(out)]
    assert main(argv) == 0
    assert (cache / name).is_file() and (out / "photo_cls_oblivious_shufflenet_v2_x0_5.png").is_file()
    (root / name).unlink()
    assert main(argv) == 0  # the second run reads the cache
    capsys.readouterr()
    monkeypatch.setattr(zoo, "_weights_enum", lambda arch, weights_name: weights_at(f"{base}/missing-0123abcd.pth"))
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "L2-CAF:" not in line]  # the log goes there too
    assert len(errors) == 1 and errors[0].startswith("caffast: error: cannot download") and "--weights FILE" in errors[0]


def test_a_cached_file_that_is_not_what_its_name_says_is_refused(tmp_path, cache, capsys):
    """torch.hub checks the hash in the name only on download; a file put in the cache by hand is
    checked too, whether it is other weights or a truncated copy."""
    right = serve_state(tmp_path, torch.nn.Linear(4, 1).state_dict(), "linear")
    other = tmp_path / "other.pth"
    torch.save(torch.nn.Linear(4, 1).state_dict(), other)
    cache.mkdir(parents=True)
    weights = weights_at(f"http://127.0.0.1:{closed_port()}/{right}")
    truncated = (tmp_path / right).read_bytes()[:-100]
    for content in (other.read_bytes(), truncated):
        (cache / right).write_bytes(content)
        with pytest.raises(ValueError) as error:
            zoo.load_state_dict("resnet18", weights)
        message = str(error.value)
        assert str(cache / right) in message and "delete it" in message
        assert f"name says {right.split('-')[1][:8]}" in message
    image = tmp_path / "photo.png"
    Image.new("RGB", (32, 32)).save(image)
    cli = ["explain", str(image), "--arch", "resnet18", "--weights", "IMAGENET1K_V1", "--out", str(tmp_path / "o")]
    torchvision_name = os.path.basename(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)
    shutil.copy(other, cache / torchvision_name)  # the offline message's advice, followed with the wrong file
    assert main(cli) == 2
    err = capsys.readouterr().err
    assert f"cached weights file {cache / torchvision_name} is not the file of" in err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """huggingface_hub pointed at an empty cache and at a closed local port, as offline."""
    constants = pytest.importorskip("huggingface_hub.constants")
    pytest.importorskip("timm")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    return tmp_path / "hf-cache"


def test_timm_weights_offline_fail_at_once_with_the_way_out(hub):
    """huggingface_hub retries a failed connection for most of a minute; one try says it all."""
    started = time.monotonic()
    with pytest.raises(FileNotFoundError) as error:
        zoo.build_model("test_vit.r160_in1k", "DEFAULT")
    assert time.monotonic() - started < 10
    message = str(error.value)
    assert "cannot download timm's pretrained weights of 'test_vit.r160_in1k' from 127.0.0.1 (offline?)" in message
    assert "--weights FILE" in message


def test_timm_weights_in_the_cache_load_offline(hub):
    safetensors = pytest.importorskip("safetensors.torch")
    import timm

    torch.manual_seed(0)
    trained = timm.create_model("test_vit.r160_in1k", pretrained=False)
    snapshot = hub / "models--timm--test_vit.r160_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    safetensors.save_file(trained.state_dict(), snapshot / "model.safetensors")
    (hub / "models--timm--test_vit.r160_in1k" / "refs").mkdir()
    (hub / "models--timm--test_vit.r160_in1k" / "refs" / "main").write_text("0" * 40)
    started = time.monotonic()
    loaded = zoo.build_model("test_vit.r160_in1k", "DEFAULT")
    assert time.monotonic() - started < 10
    assert all(torch.equal(value, trained.state_dict()[key]) for key, value in loaded.state_dict().items())


def test_timm_weights_whose_cache_blob_is_not_its_hash_are_refused(hub):
    """The Hugging Face cache names each weights blob by its sha256; another file in its place (a
    truncated download, a copy) is refused instead of loaded."""
    safetensors = pytest.importorskip("safetensors.torch")
    import timm

    repository = hub / "models--timm--test_vit.r160_in1k"
    staging = hub / "staging.safetensors"
    hub.mkdir()
    safetensors.save_file(timm.create_model("test_vit.r160_in1k").state_dict(), staging)
    digest = hashlib.sha256(staging.read_bytes()).hexdigest()
    (repository / "blobs").mkdir(parents=True)
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text("0" * 40)
    snapshot = repository / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(repository / "blobs" / digest)
    torch.manual_seed(1)
    safetensors.save_file(timm.create_model("test_vit.r160_in1k").state_dict(), repository / "blobs" / digest)
    with pytest.raises(ValueError, match=rf"the cached weights file {repository / 'blobs' / digest} is not the file of"):
        zoo.build_model("test_vit.r160_in1k", "DEFAULT")
    staging.replace(repository / "blobs" / digest)
    zoo.build_model("test_vit.r160_in1k", "DEFAULT")  # the right content loads


@pytest.mark.parametrize("proxy", [None, "http://127.0.0.1:9"])
def test_behind_a_proxy_timm_downloads_instead_of_probing_the_host(proxy, hub, monkeypatch):
    """A direct connection says nothing where downloads go through a proxy: timm is left to try."""
    import timm
    from huggingface_hub import constants

    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    if proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy)
    offline_modes = []

    def create_model(*args, **kwargs):
        offline_modes.append(constants.HF_HUB_OFFLINE)
        raise RuntimeError("not in the cache" if constants.HF_HUB_OFFLINE else "the download failed")

    monkeypatch.setattr(timm, "create_model", create_model)
    with pytest.raises(FileNotFoundError) as error:
        zoo.build_model("test_vit.r160_in1k", "DEFAULT")
    if proxy:
        assert offline_modes == [True, False] and "the download failed" in str(error.value)
    else:
        assert offline_modes == [True] and "(offline?)" in str(error.value)
