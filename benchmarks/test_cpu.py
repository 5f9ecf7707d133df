"""CPU speed: caffast against the reference loop and Grad-CAM, side by side in one run.

    pytest benchmarks/test_cpu.py --benchmark-group-by=group --benchmark-columns=mean,stddev,rounds

Groups: "<arch>-b<batch>-end-to-end" (explain with its forward pass, against Grad-CAM) and
"<arch>-<mode>-<stopping>-loop" (the optimization loop alone, batch 1, against the reference loop).
"""

import pytest
import torch

import caffast
from caffast.backends import resolve_backend
from caffast.eval.gradcam import grad_cam
from caffast.core.constraints import CONSTRAINTS
from caffast.core.heads import detect_head, precompute
from caffast.core.losses import CLASS_LOSSES
from caffast.core.loop import LoopSettings
from caffast.core.breakpoints import split
from caffast.engine.solvers import fused_loop
from caffast.models.zoo import reference_head
from conftest import ARCHITECTURES, STOPPING
from reference_fast import reference_fast_loop

pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")

ROUNDS = dict(rounds=2, iterations=1, warmup_rounds=1)


def layer_module(model, arch):
    return model.get_submodule(ARCHITECTURES[arch])


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("arch", ARCHITECTURES)
class TestEndToEnd:
    @pytest.mark.parametrize("stopping", STOPPING)
    @pytest.mark.parametrize("mode", ["oblivious", "specific"])
    @pytest.mark.parametrize("backend", ["cpp", "torch"])
    def test_caffast_explain(self, benchmark, models, images, arch, batch, mode, stopping, backend):
        model, x = models(arch), images[:batch]
        benchmark.group = f"{arch}-b{batch}-end-to-end"
        benchmark.name = f"caffast {backend} {mode} {stopping}"
        result = benchmark.pedantic(
            caffast.explain, args=(model, x, ARCHITECTURES[arch]),
            kwargs=dict(mode=mode, backend=backend, **STOPPING[stopping]), **ROUNDS,
        )
        assert result.path == "fused"
        benchmark.extra_info["iterations"] = result.iterations.float().mean().item()

    @pytest.mark.parametrize("mode", ["oblivious", "specific"])
    def test_caffast_explain_exact(self, benchmark, models, images, arch, batch, mode):
        """solver="exact": the minimizer without the loop (closed forms on these heads)."""
        model, x = models(arch), images[:batch]
        benchmark.group = f"{arch}-b{batch}-end-to-end"
        benchmark.name = f"caffast exact {mode}"
        result = benchmark.pedantic(
            caffast.explain, args=(model, x, ARCHITECTURES[arch]), kwargs=dict(mode=mode, solver="exact"), **ROUNDS,
        )
        assert result.path == "fused"
        benchmark.extra_info["iterations"] = result.iterations.float().mean().item()

    def test_pytorch_grad_cam(self, benchmark, models, images, arch, batch):
        model, x = models(arch), images[:batch]
        benchmark.group = f"{arch}-b{batch}-end-to-end"
        benchmark.name = "pytorch-grad-cam GradCAM"
        with pytorch_grad_cam.GradCAM(model=model, target_layers=[layer_module(model, arch)]) as cam:
            benchmark.pedantic(cam, kwargs=dict(input_tensor=x, targets=None), **ROUNDS)

    def test_caffast_grad_cam(self, benchmark, models, images, arch, batch):
        model, x = models(arch), images[:batch]
        benchmark.group = f"{arch}-b{batch}-end-to-end"
        benchmark.name = "caffast grad_cam"
        benchmark.pedantic(grad_cam, args=(model, x, ARCHITECTURES[arch]), **ROUNDS)


@pytest.mark.parametrize("stopping", STOPPING)
@pytest.mark.parametrize("mode", ["oblivious", "specific"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
class TestLoop:
    """The optimization alone, on one image's captured feature map."""

    @pytest.fixture
    def captured(self, models, images, arch):
        model = models(arch)
        with torch.no_grad():
            capture, tail = split(model, ARCHITECTURES[arch], images[:1])
        return model, capture, tail

    def test_reference_loop(self, benchmark, captured, arch, mode, stopping):
        model, capture, _ = captured
        head = reference_head(arch, model)
        target = int(capture.output.argmax()) if mode == "specific" else None
        benchmark.group = f"{arch}-{mode}-{stopping}-loop"
        benchmark.name = "reference loop (autograd, one problem)"
        iterations = benchmark.pedantic(
            reference_fast_loop, args=(head, capture.features, capture.output, target),
            kwargs=STOPPING[stopping], rounds=1, iterations=1,
        )
        benchmark.extra_info["iterations"] = iterations

    @pytest.mark.parametrize("backend", ["cpp", "torch"])
    def test_caffast_loop(self, benchmark, captured, arch, mode, stopping, backend):
        _, capture, tail = captured
        grid = tuple(capture.features.shape[2:])
        spec = detect_head(tail, grid)
        index = torch.zeros(1, dtype=torch.long)
        targets = capture.output.argmax(dim=1)
        head = precompute(spec, capture.features, index, mode, CLASS_LOSSES["release"], targets)
        settings = LoopSettings(optimizer="sgd", lr=0.5, check_every=50, **STOPPING[stopping])
        initial = torch.ones(1, *grid, dtype=torch.float64)
        benchmark.group = f"{arch}-{mode}-{stopping}-loop"
        benchmark.name = f"caffast {backend} loop"
        chosen, constraint = resolve_backend(backend, torch.device("cpu")), CONSTRAINTS["l2norm"]
        solution = benchmark.pedantic(fused_loop, args=(chosen, head, constraint, initial, settings), **ROUNDS)
        benchmark.extra_info["iterations"] = solution.iterations.item()
