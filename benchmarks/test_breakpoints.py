"""Any breakpoint: caffast's solvers against the reference loop restated at the same breakpoint and
pytorch-grad-cam's GradCAM at the same layer, side by side in one run.

    pytest benchmarks/test_breakpoints.py --benchmark-group-by=group --benchmark-json=breakpoints.json

Groups are "<model>-<layer>-b<batch>-<mode>".  The loops ("reference", "gd", "exact") run
CAFFAST_BENCH_ITERATIONS iterations (100 by default, the CPU machine's budget; 1000 on a GPU) with
min_error 0, so every method does its full work; the reference loop runs one image (batch-1
groups only).  Every row records the objective it reached and the tail evaluations it used, so the
solvers' quality is read off the same run (benchmarks/quality.py compares fast with gd at 1000).
CAFFAST_BENCH_BATCHES (default "1,8") chooses the batch sizes.
"""

import functools
import os

import pytest
import torch
import torchvision

import caffast
from reference_hook import reference_hook_loop

pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")

BREAKPOINTS = {
    "resnet50-layer3": ("resnet50", "layer3"),
    "resnet50-layer4.1": ("resnet50", "layer4.1"),
    "vgg16-features": ("vgg16", "features"),
    "mobilenet_v3_large-features": ("mobilenet_v3_large", "features"),
    "convnext_tiny-features": ("convnext_tiny", "features"),
    "densenet121-denseblock3": ("densenet121", "features.denseblock3"),
    "efficientnet_b0-features.5": ("efficientnet_b0", "features.5"),
}
ITERATIONS = int(os.environ.get("CAFFAST_BENCH_ITERATIONS", "100"))
BATCHES = [int(b) for b in os.environ.get("CAFFAST_BENCH_BATCHES", "1,8").split(",")]
LOOP = dict(max_iter=ITERATIONS, min_error=0.0)
ONCE = dict(rounds=1, iterations=1, warmup_rounds=0)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_model(arch: str, device: torch.device = DEVICE) -> torch.nn.Module:
    """A random-weight model whose batch-norm statistics come from a batch of random images, so that
    activations have unit scale as in a trained network (with the raw initialization some nets,
    mobilenet_v3 and efficientnet among them, output about 1e-20 and every problem is void)."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: one batch sets the statistics
    if norms:
        model.train()
        with torch.no_grad():
            model(torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(3)))
    return model.eval().to(device)


@pytest.fixture(scope="module")
def models():
    """The batch-norm-calibrated models (not conftest's), each built once."""
    return functools.cache(build_model)


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 224, 224, generator=generator).to(DEVICE)


def record(benchmark, result: caffast.Explanation) -> None:
    benchmark.extra_info["objective"] = result.objective.mean().item()
    benchmark.extra_info["evaluations"] = result.evaluations.float().mean().item()
    benchmark.extra_info["path"] = result.path


@pytest.mark.parametrize("mode", ["oblivious", "specific"])
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("case", BREAKPOINTS)
class TestAnyBreakpoint:
    def _case(self, benchmark, models, images, case, batch, mode):
        arch, layer = BREAKPOINTS[case]
        benchmark.group = f"{case}-b{batch}-{mode}"
        return models(arch), images[:batch], layer

    @pytest.mark.parametrize("solver", ["gd", "fast", "exact"])
    def test_caffast(self, benchmark, models, images, case, batch, mode, solver):
        model, x, layer = self._case(benchmark, models, images, case, batch, mode)
        benchmark.name = f"caffast {solver}" + (f" {ITERATIONS} iterations" if solver != "fast" else "")
        options = dict(mode=mode, solver=solver, **(LOOP if solver != "fast" else {}))
        result = benchmark.pedantic(caffast.explain, args=(model, x, layer), kwargs=options, **ONCE)
        record(benchmark, result)

    def test_reference_loop(self, benchmark, models, images, case, batch, mode):
        if batch != 1:
            pytest.skip("the reference loop runs one image at a time: timed at batch 1")
        model, x, layer = self._case(benchmark, models, images, case, batch, mode)
        benchmark.name = f"reference loop (hook, model rerun) {ITERATIONS} iterations"
        target = int(model(x).argmax()) if mode == "specific" else None
        flags = [p.requires_grad for p in model.parameters()]
        for parameter in model.parameters():  # the release freezes the network
            parameter.requires_grad_(False)
        try:
            steps = benchmark.pedantic(reference_hook_loop, args=(model, x, layer, target), kwargs=LOOP, **ONCE)
        finally:
            for parameter, flag in zip(model.parameters(), flags):
                parameter.requires_grad_(flag)
        benchmark.extra_info["evaluations"] = steps

    def test_pytorch_grad_cam(self, benchmark, models, images, case, batch, mode):
        model, x, layer = self._case(benchmark, models, images, case, batch, mode)
        benchmark.name = "pytorch-grad-cam GradCAM"
        with pytorch_grad_cam.GradCAM(model=model, target_layers=[model.get_submodule(layer)]) as cam:
            benchmark.pedantic(cam, kwargs=dict(input_tensor=x, targets=None), rounds=2, iterations=1, warmup_rounds=1)
