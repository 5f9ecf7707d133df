"""Backends: each object states the Backend interface, resolve_backend picks as documented, and
"cpp" equals "torch" on the fused heads and on the generic tail."""

import importlib.util
import inspect
import os

import pytest
import torch

import caffast
from caffast.backends import BACKENDS, Backend, resolve_backend
from caffast.backends.cpp.backend import CppBackend
from caffast.backends.torch.backend import TorchBackend
from fused_models import FUSED_FAMILIES, build

HAS_TRITON = importlib.util.find_spec("triton") is not None


def backend_objects() -> list:
    objects = [TorchBackend(), CppBackend()]
    if HAS_TRITON:
        from caffast.backends.triton.backend import TritonBackend

        objects.append(TritonBackend())
    return objects


@pytest.mark.parametrize("backend", backend_objects(), ids=lambda backend: backend.name)
def test_each_backend_object_satisfies_the_protocol(backend):
    assert isinstance(backend, Backend)
    assert backend.name in BACKENDS and backend.name != "auto"
    assert backend.device_type in (None, "cpu", "cuda")
    assert isinstance(backend.nonlinear_losses, tuple) and all(isinstance(loss, str) for loss in backend.nonlinear_losses)
    assert isinstance(backend.available(), bool)
    for name in ("available", "require", "solve_fused", "filter_multiply"):
        wanted = list(inspect.signature(getattr(Backend, name)).parameters)[1:]
        assert list(inspect.signature(getattr(backend, name)).parameters) == wanted, name
    assert isinstance(type(backend).bundle_qp, property)
    if backend.name == "torch":
        assert backend.bundle_qp is None and backend.nonlinear_losses == ()
    else:
        assert backend.nonlinear_losses == ("log_softmax",)


def test_resolve_backend_picks_as_documented():
    cpu, cuda, meta = torch.device("cpu"), torch.device("cuda"), torch.device("meta")
    assert resolve_backend("auto", cpu).name == "cpp"
    assert resolve_backend("torch", cpu).name == "torch"
    assert resolve_backend("cpp", cpu).name == "cpp"
    assert resolve_backend("torch", cuda).name == "torch"
    assert resolve_backend("auto", meta).name == "torch"
    triton_runs = HAS_TRITON and resolve_backend("triton", cuda).available()
    assert resolve_backend("auto", cuda).name == ("triton" if triton_runs else "torch")
    with pytest.raises(ValueError, match="backend 'cpp' runs on the CPU but the model is on cuda; use backend='triton' or 'torch'"):
        resolve_backend("cpp", cuda)
    with pytest.raises(ValueError, match="unknown backend 'tpu'; choose one of 'auto', 'torch', 'cpp', 'triton'"):
        resolve_backend("tpu", cpu)


@pytest.mark.skipif(not HAS_TRITON or torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="the triton backend computes on this machine")  # fmt: skip
def test_resolve_backend_refuses_triton_for_a_cpu_model_without_the_interpreter():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.device("cpu"))


@pytest.mark.parametrize("arch,layer,size", FUSED_FAMILIES)
def test_cpp_equals_torch_on_fused_heads(arch, layer, size):
    model = build(arch)
    images = torch.randn(2, 3, size, size, dtype=torch.float64)
    for mode, targets in (("oblivious", None), ("specific", [0, 5])):
        settings = dict(mode=mode, targets=targets, max_iter=200, check_every=10, min_error=1e-7)
        torch_run = caffast.explain(model, images, layer, backend="torch", **settings)
        cpp_run = caffast.explain(model, images, layer, backend="cpp", **settings)
        assert (torch_run.path, cpp_run.path, cpp_run.backend) == ("fused", "fused", "cpp")
        torch.testing.assert_close(cpp_run.maps, torch_run.maps, atol=1e-9, rtol=0)
        torch.testing.assert_close(cpp_run.loss, torch_run.loss, atol=1e-9, rtol=1e-9)
        assert torch.equal(cpp_run.iterations, torch_run.iterations)


@pytest.mark.parametrize("constraint", ["l2norm", "softmax", "gauss"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_cpp_equals_torch_for_every_constraint_and_optimizer(constraint, optimizer):
    model = build("relu_head")
    images = torch.randn(3, 3, 24, 24, dtype=torch.float64)
    for mode, targets in (("oblivious", None), ("specific", [2, 9])):
        settings = dict(
            mode=mode, targets=targets, max_iter=150, check_every=10, min_error=1e-8,
            constraint=constraint, optimizer=optimizer, init="normal", seed=3,
        )
        torch_run = caffast.explain(model, images, "features", backend="torch", **settings)
        cpp_run = caffast.explain(model, images, "features", backend="cpp", **settings)
        torch.testing.assert_close(cpp_run.maps, torch_run.maps, atol=1e-9, rtol=0)
        assert torch.equal(cpp_run.iterations, torch_run.iterations)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_hadamard_on_the_generic_tail(dtype):
    model = build("resnet18").to(dtype)
    images = torch.randn(2, 3, 64, 64, dtype=dtype)
    settings = dict(mode="specific", targets=[1, 4], max_iter=8, check_every=5, min_error=0.0)
    torch_run = caffast.explain(model, images, "layer4.1.conv2", backend="torch", **settings)
    cpp_run = caffast.explain(model, images, "layer4.1.conv2", backend="cpp", **settings)
    assert cpp_run.path == "generic"
    tolerance = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(cpp_run.maps, torch_run.maps, atol=tolerance, rtol=0)


def test_auto_picks_cpp_on_the_cpu():
    exp = caffast.explain(build("resnet18"), torch.randn(1, 3, 64, 64, dtype=torch.float64), "layer4", max_iter=2)
    assert exp.backend == "cpp"


def test_large_outputs_do_not_cancel():
    """Huge logits: the fused class-oblivious loss stays exact where g = 1 reproduces NT."""
    model = build("resnet18")
    with torch.no_grad():
        model.fc.weight.mul_(1e8)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)  # a 1 x 1 grid: g = 1, the loss is 0
    for backend in ("torch", "cpp"):
        exp = caffast.explain(model, images, "layer4", backend=backend, max_iter=5)
        assert exp.loss.abs().max() < 1e-6
