import os

# Threads of a parallel region that run out of work sleep instead of spinning: a spinning thread takes
# a core from the processes that have work (the test workers share 2 cores), and on a busy machine
# it made runs several times slower.  The OpenMP runtime reads this when torch is imported below.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from urllib.error import URLError  # noqa: E402
from urllib.parse import urlparse  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


# Two intra-op threads in all, whatever the machine's core count: pytest-xdist's workers share them.
THREADS = max(1, 2 // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(THREADS)
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
