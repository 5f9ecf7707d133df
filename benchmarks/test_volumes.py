"""Clips and volumes (CPU): caffast against pytorch-grad-cam's 3-D GradCAM, side by side in one run.

    pytest benchmarks/test_volumes.py --benchmark-group-by=group --benchmark-columns=mean,min,rounds

Groups "<model>-b<batch>": explain at the last block (r3d_18's layer4 on 16 x 112 x 112 clips, a
2 x 7 x 7 map; VolumeNet's block2 on 16 x 16 x 16 volumes, 8 x 8 x 8), its fused head run for 1000
iterations (min_error 0), against GradCAM at the same layer.  Groups "<model>-intermediate":
solver="fast" and "exact" (max_iter 10 on r3d_18, 100 on VolumeNet) at an intermediate breakpoint
(r3d_18's layer3, VolumeNet's block1), batch 1, class-specific, against GradCAM there.  Random
weights, float32; "iterations" is the tail evaluations of fast and exact.
"""

import pytest
import torch
import torchvision

import caffast
from caffast.eval.volumes import VolumeNet

pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

ROUNDS = dict(rounds=3, iterations=1, warmup_rounds=1)
LAST = {"r3d_18": "layer4", "volume_net": "block2"}
INTERMEDIATE = {"r3d_18": "layer3", "volume_net": "block1"}
INPUTS = {"r3d_18": (3, 16, 112, 112), "volume_net": (1, 16, 16, 16)}
LOOP = dict(max_iter=1000, min_error=0.0)  # every problem runs all 1000 iterations
# at the intermediate breakpoint exact runs the loop, fast, then a descent of at most 10 * max_iter
# evaluations: on r3d_18 an evaluation is layer4 forward and backward on the clip, about a second
INTERMEDIATE_ITERATIONS = {"r3d_18": 10, "volume_net": 100}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.video.r3d_18() if name == "r3d_18" else VolumeNet(channels=16, classes=10)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    return {name: build(name) for name in LAST}


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(1)
    return {name: torch.randn(8, *shape, generator=generator) for name, shape in INPUTS.items()}


def grad_cam_targets(model: torch.nn.Module, x: torch.Tensor) -> list:
    with torch.no_grad():
        return [ClassifierOutputTarget(int(c)) for c in model(x).argmax(dim=1)]


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("name", LAST)
class TestLastBlock:
    @pytest.mark.parametrize("mode", ["oblivious", "specific"])
    def test_caffast_explain(self, benchmark, models, inputs, name, batch, mode):
        model, x = models[name], inputs[name][:batch]
        benchmark.group = f"{name}-b{batch}"
        benchmark.name = f"caffast {mode} 1000 iterations"
        options = dict(mode=mode, **LOOP)
        result = benchmark.pedantic(caffast.explain, args=(model, x, LAST[name]), kwargs=options, **ROUNDS)
        assert result.path == "fused" and (result.iterations == 1000).all()
        benchmark.extra_info["iterations"] = 1000

    def test_pytorch_grad_cam(self, benchmark, models, inputs, name, batch):
        model, x = models[name], inputs[name][:batch]
        benchmark.group = f"{name}-b{batch}"
        benchmark.name = "pytorch-grad-cam GradCAM"
        targets = grad_cam_targets(model, x)
        with pytorch_grad_cam.GradCAM(model=model, target_layers=[model.get_submodule(LAST[name])]) as cam:
            benchmark.pedantic(cam, kwargs=dict(input_tensor=x, targets=targets), **ROUNDS)


@pytest.mark.parametrize("name", INTERMEDIATE)
class TestIntermediate:
    @pytest.mark.parametrize("solver", ["fast", "exact"])
    def test_caffast_solver(self, benchmark, models, inputs, name, solver):
        model, x = models[name], inputs[name][:1]
        benchmark.group = f"{name}-intermediate"
        benchmark.name = f"caffast {solver}"
        options = dict(mode="specific", solver=solver, max_iter=INTERMEDIATE_ITERATIONS[name])
        result = benchmark.pedantic(caffast.explain, args=(model, x, INTERMEDIATE[name]), kwargs=options,
                                    rounds=1, iterations=1, warmup_rounds=0)  # fmt: skip
        assert result.path == "generic"
        benchmark.extra_info["iterations"] = int(result.evaluations.max())
        benchmark.extra_info["objective"] = float(result.objective.mean())

    def test_pytorch_grad_cam(self, benchmark, models, inputs, name):
        model, x = models[name], inputs[name][:1]
        benchmark.group = f"{name}-intermediate"
        benchmark.name = "pytorch-grad-cam GradCAM"
        with pytorch_grad_cam.GradCAM(model=model, target_layers=[model.get_submodule(INTERMEDIATE[name])]) as cam:
            benchmark.pedantic(cam, kwargs=dict(input_tensor=x, targets=grad_cam_targets(model, x)), **ROUNDS)
