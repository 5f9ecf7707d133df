"""explain(backend="triton") equals backend="torch": the fused loop and the generic tail's Hadamard.

Runs on a CUDA GPU, or on the CPU under TRITON_INTERPRET=1 (tests/backends/test_triton_interpreted.py)."""

import os

import pytest
import torch

import caffast
from fused_models import build

if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("constraint,optimizer", [("l2norm", "sgd"), ("softmax", "adam"), ("gauss", "sgd")])
def test_triton_equals_torch_on_a_fused_relu_head(constraint, optimizer):
    model = build("relu_head").to(DEVICE)
    images = torch.randn(2, 3, 24, 24, dtype=torch.float64, device=DEVICE)
    for mode, targets, loss in (("oblivious", None, "margin"), ("specific", [1, 6], "release"),
                                ("specific", [1, 6], "log_softmax")):  # fmt: skip
        settings = dict(mode=mode, targets=targets, max_iter=40, check_every=5, min_error=1e-7,
                        constraint=constraint, optimizer=optimizer, loss=loss)
        expected = caffast.explain(model, images, "features", backend="torch", **settings)
        result = caffast.explain(model, images, "features", backend="triton", **settings)
        assert (result.path, result.backend) == ("fused", "triton")
        torch.testing.assert_close(result.maps, expected.maps, atol=1e-9, rtol=0)
        assert torch.equal(result.iterations, expected.iterations)


def test_triton_hadamard_on_the_generic_tail():
    model = build("relu_head").to(DEVICE)
    images = torch.randn(2, 3, 24, 24, dtype=torch.float64, device=DEVICE)
    settings = dict(mode="specific", targets=[0, 3], max_iter=15, check_every=5, min_error=0.0)
    expected = caffast.explain(model, images, "features.1", backend="torch", **settings)
    result = caffast.explain(model, images, "features.1", backend="triton", **settings)
    assert result.path == "generic"
    torch.testing.assert_close(result.maps, expected.maps, atol=1e-10, rtol=0)
