from urllib.error import URLError
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Tests never reach the network: a download from anywhere but 127.0.0.1 fails as it does offline."""
    download = torch.hub.download_url_to_file

    def local_only(url, *args, **kwargs):
        if urlparse(url).hostname != "127.0.0.1":
            raise URLError("the tests do not reach the network")
        return download(url, *args, **kwargs)

    monkeypatch.setattr(torch.hub, "download_url_to_file", local_only)


@pytest.fixture
def photo(tmp_path):
    """A 300 x 240 RGB picture of random pixels, as a PNG file."""
    path = tmp_path / "photo.png"
    pixels = np.random.default_rng(0).integers(0, 255, size=(240, 300, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path
