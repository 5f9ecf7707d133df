"""The generic path's CUDA-graph replay against eager evaluation (needs a CUDA GPU; skipped without)."""

import pytest
import torch
import torchvision

import caffast

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval().cuda()


@pytest.mark.parametrize("mode", ["oblivious", "specific"])
def test_replayed_loop_equals_the_eager_loop(model, mode):
    images = torch.randn(3, 3, 96, 96, device="cuda")
    options = dict(mode=mode, max_iter=120, min_error=1e-4)
    eager = caffast.explain(model, images, "layer3", cuda_graphs=False, **options)
    replayed = caffast.explain(model, images, "layer3", **options)
    assert replayed.path == eager.path == "generic"
    torch.testing.assert_close(replayed.maps, eager.maps, rtol=0, atol=1e-6)
    assert torch.equal(replayed.iterations, eager.iterations)


def test_an_uncapturable_objective_falls_back_to_eager(model):
    images = torch.randn(2, 3, 64, 64, device="cuda")

    def synchronizing(output, reference):
        if float(output.abs().max()) < 0:  # a host read: not capturable
            raise AssertionError
        return (output - reference).square().mean(1)

    eager = caffast.explain(model, images, "layer3", objective=synchronizing, max_iter=30, cuda_graphs=False)
    with pytest.warns(RuntimeWarning, match="CUDA graph"):
        replayed = caffast.explain(model, images, "layer3", objective=synchronizing, max_iter=30)
    torch.testing.assert_close(replayed.maps, eager.maps, rtol=0, atol=1e-6)
