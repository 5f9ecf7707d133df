import functools
import sys
from pathlib import Path

import pytest
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).parent))

ARCHITECTURES = {"resnet50": "layer4", "googlenet": "inception5b", "densenet169": "features"}
STOPPING = {"1000-iterations": dict(max_iter=1000, min_error=0.0), "default-stop": dict(max_iter=1000, min_error=1e-6)}


def build(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = dict(aux_logits=False, init_weights=True) if arch == "googlenet" else {}
    return getattr(torchvision.models, arch)(**kwargs).eval()


@pytest.fixture(scope="session")
def models():
    return functools.cache(build)


@pytest.fixture(scope="session")
def images():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 224, 224, generator=generator)
