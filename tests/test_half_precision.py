"""bfloat16 and float16 models: explained with float32 filters, maps close to the float32 model's."""

import copy

import pytest
import torch

from caffast import explain
from caffast.eval.scenes import make_scene, normalize
from caffast.eval.demo_model import load_demo_model

# bfloat16 keeps 8 bits of mantissa, float16 11: the maps (unit norm, cells about 0.1) move accordingly
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3}


def _cpu_supports(dtype: torch.dtype) -> bool:
    try:
        torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3, dtype=dtype), torch.ones(1, 1, 1, 1, dtype=dtype))
    except RuntimeError:
        return False
    return True


@pytest.fixture(scope="module")
def scenes():
    return torch.stack([normalize(make_scene(seed, objects=2).image) for seed in (3, 4)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("mode", ["oblivious", "specific"])
@pytest.mark.parametrize("fused,backend", [(True, "auto"), (False, "auto")])
def test_half_precision_model_matches_float32(dtype, mode, fused, backend, scenes):
    if not _cpu_supports(dtype):
        pytest.skip(f"this CPU build has no {dtype} convolutions")
    model = load_demo_model()
    half = copy.deepcopy(model).to(dtype)
    targets = torch.tensor([[0, 2], [1, 4]]) if mode == "specific" else None
    options = dict(mode=mode, targets=targets, max_iter=40, fused=fused, backend=backend)
    reference = explain(model, scenes, "features", **options)
    result = explain(half, scenes.to(dtype), "features", **options)

    assert result.path == ("fused" if fused else "generic")
    for name in ("filters", "parameters", "maps", "loss"):
        assert getattr(result, name).dtype == torch.float32, name
    assert torch.equal(result.targets, reference.targets)
    torch.testing.assert_close(result.maps, reference.maps, atol=TOLERANCE[dtype], rtol=0)
    assert next(half.parameters()).dtype == dtype  # the model is handed back in its own precision
