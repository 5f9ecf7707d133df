"""Clips and volumes: L2-CAF with a (D, H, W) filter, against an independent oracle.

The oracle is tests/reference_loop.py, the reference loop restated in plain PyTorch (autograd
through the model, the breakpoint's output replaced by a forward hook) with a filter on the
breakpoint map's grid, (D, H, W) here.  Models are float64 with random weights:

- torchvision's r3d_18 at layer4 (a fused head: AdaptiveAvgPool3d -> flatten -> fc).  Its layers
  before layer3 cost seconds per forward on a CPU and change nothing after layer4, so the problems
  are posed on `truncated`: r3d_18 with the stem and layer1 to layer3 replaced by nn.Identity, fed
  the layer3 output of two 16 x 32 x 32 clips (layer4's grid: 2 x 2 x 2).  One test runs the whole
  network on a clip.  The oracle runs on r3d_18's own tail (avgpool, flatten, fc) after layer4.
- caffast.eval.volumes.VolumeNet at block1, an intermediate breakpoint (its tail: Conv3d,
  BatchNorm3d, ReLU, pool, Linear; the generic path with folds), on 8 x 16 x 16 volumes.

min_error is picked from the oracle's own loss history, so that some problems stop early and
others run to max_iter (as tests/test_parity.py does); maps agree to 1e-5 and iterations exactly.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_loop import capture, min_check_delta, reference_l2caf  # noqa: E402

import caffast  # noqa: E402
from caffast import viz  # noqa: E402
from caffast.backends import cpp  # noqa: E402
from caffast.core.breakpoints import split  # noqa: E402
from caffast.core.constraints import as_constraint  # noqa: E402
from caffast.core.folds import fold_tail  # noqa: E402
from caffast.eval.volumes import VolumeNet, ball_volumes  # noqa: E402

F64 = torch.float64
CLASSES = 6


@pytest.fixture(autouse=True)
def _one_thread():
    """The loops run thousands of tiny ops, which extra threads only slow down."""
    torch.set_num_threads(1)
    yield


def _calibrate_batch_norm(model: nn.Module, inputs: torch.Tensor) -> nn.Module:
    """Running statistics from one batch (unit-scale activations), then eval mode."""
    for norm in model.modules():
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            norm.reset_running_stats()
            norm.momentum = None
    model.train()
    with torch.no_grad():
        model(inputs)
    return model.eval()


@pytest.fixture(scope="module")
def r3d():
    """r3d_18 (float64, 6 classes), two clips, and the network from layer4 on fed their layer3 output."""
    torch.manual_seed(0)
    model = torchvision.models.video.r3d_18(num_classes=CLASSES).double().eval()  # activations of unit scale
    clips = torch.randn(2, 3, 16, 32, 32, dtype=F64, generator=torch.Generator().manual_seed(1))
    _, layer3 = capture(model, "layer3", clips)
    truncated = copy.deepcopy(model)
    for name in ("stem", "layer1", "layer2", "layer3"):
        setattr(truncated, name, nn.Identity())
    return model, clips, truncated, layer3


def r3d_tail(model: nn.Module) -> nn.Module:
    """r3d_18 after layer4 as the oracle's model: an identity breakpoint, then VideoResNet's forward."""
    return nn.Sequential(OrderedDict(breakpoint=nn.Identity(), avgpool=model.avgpool, flatten=nn.Flatten(1), fc=model.fc))


@pytest.fixture(scope="module")
def volume_net():
    """VolumeNet (float64, 5 classes) and two 8 x 12 x 12 volumes."""
    torch.manual_seed(2)
    model = VolumeNet(channels=4, classes=5).double()
    volumes = torch.randn(2, 1, 8, 12, 12, dtype=F64, generator=torch.Generator().manual_seed(3))
    return _calibrate_batch_norm(model, volumes), volumes


def oracle_runs(model, inputs, layer, targets, mode, **settings):
    """The oracle on every (input, target) problem, with a min_error calibrated on its own losses.

    The oracle first runs every problem without stopping (min_error 0) and records the loss at each
    check; min_error is put in the widest gap (ratio above 1.1) of the sorted check deltas that lets
    some problems stop and not others, and the ones that stop are solved again with it.
    Returns (min_error, [[result per target] per input]).
    """
    rows = [list(targets) if mode == "specific" else [None]] * len(inputs)

    def solve(n, target, min_error):
        return reference_l2caf(model, inputs[n : n + 1], layer, target, mode=mode, min_error=min_error, **settings)

    full = [[solve(n, t, 0.0) for t in row] for n, row in enumerate(rows)]
    flat = [r for row in full for r in row]
    smallest = [min_check_delta(r["history"]) for r in flat]
    deltas = sorted({abs(b[1] - a[1]) for r in flat for a, b in zip(r["history"], r["history"][1:])} - {0.0})
    best = None
    for low, high in zip(deltas, deltas[1:]):
        stops = sum(d < math.sqrt(low * high) for d in smallest)
        if high / low > 1.1 and 0 < stops < len(flat) and (best is None or high / low > best[0]):
            best = (high / low, math.sqrt(low * high))
    assert best is not None, "no min_error splits the problems into stopping and running"
    min_error = best[1]
    runs = [[solve(n, t, min_error) if min_check_delta(r["history"]) < min_error else r for t, r in zip(row, got)]
            for n, (row, got) in enumerate(zip(rows, full))]  # fmt: skip
    return min_error, runs


def assert_matches(exp, runs, grid):
    """Maps within 1e-5 of the oracle's and the same iterations, for every problem."""
    for n, row in enumerate(runs):
        for t, r in enumerate(row):
            assert int(exp.iterations[n, t]) == r["iterations"], (n, t, exp.iterations.tolist())
            assert exp.maps[n, t].shape == grid
            torch.testing.assert_close(exp.maps[n, t], r["map"], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# r3d_18 at layer4: the fused head, every backend and the generic path against the oracle

R3D_CASES = {
    "oblivious": dict(mode="oblivious"),
    "specific": dict(mode="specific", targets=[1, 4]),
    "softmax": dict(mode="oblivious", constraint="softmax", lr=2.0),
    "gauss": dict(mode="specific", targets=[0], constraint="gauss", lr=5.0),
    "adam": dict(mode="specific", targets=[3], optimizer="adam", lr=0.05),
}


@pytest.mark.parametrize("case", R3D_CASES)
def test_r3d18_layer4_matches_the_oracle(r3d, case):
    model, _, truncated, layer3 = r3d
    options = dict(R3D_CASES[case])
    mode, targets = options.pop("mode"), options.pop("targets", None)
    loop = dict(max_iter=100, check_every=10, **options)
    _, layer4 = capture(truncated, "layer4", layer3)
    min_error, runs = oracle_runs(r3d_tail(model), layer4, "breakpoint", targets, mode, **loop)
    results = {}
    for backend in ("cpp", "torch"):
        exp = caffast.explain(truncated, layer3, "layer4", mode=mode, targets=targets, loss="release", backend=backend,
                              min_error=min_error, **loop)  # fmt: skip
        assert exp.path == "fused" and exp.backend == backend and exp.parameters.shape[2:] == \
            ((3,) if options.get("constraint") == "gauss" else (2, 2, 2))  # fmt: skip
        assert_matches(exp, runs, (2, 2, 2))
        results[backend] = exp
    torch.testing.assert_close(results["cpp"].parameters, results["torch"].parameters, rtol=0, atol=1e-9)
    assert torch.equal(results["cpp"].iterations, results["torch"].iterations)


@pytest.mark.parametrize("mode", ["oblivious", "specific"])
def test_r3d18_layer4_fused_equals_generic(r3d, mode):
    """The closed form of the 3-D head against autograd through r3d_18's own tail."""
    _, _, truncated, layer3 = r3d
    targets = [1, 4] if mode == "specific" else None
    fused, generic = (caffast.explain(truncated, layer3, "layer4", mode=mode, targets=targets, max_iter=60,
                                      check_every=10, fused=path) for path in (True, False))  # fmt: skip
    assert (fused.path, generic.path) == ("fused", "generic")
    assert torch.equal(fused.iterations, generic.iterations)
    torch.testing.assert_close(fused.maps, generic.maps, rtol=0, atol=1e-9)
    torch.testing.assert_close(fused.objective, generic.objective, rtol=1e-9, atol=1e-12)


def test_r3d18_on_clips_end_to_end(r3d):
    """The whole network on (N, 3, T, H, W) clips: the map grid is layer4's (2, 2, 2), features are
    layer4's output, and the maps are the oracle's (run on the tail after layer4)."""
    model, clips, _, _ = r3d
    exp = caffast.explain(model, clips, "layer4", max_iter=40, check_every=10, min_error=0.0)
    nt, layer4 = capture(model, "layer4", clips)
    assert exp.path == "fused" and exp.maps.shape == (2, 1, 2, 2, 2)
    torch.testing.assert_close(exp.features, layer4)
    torch.testing.assert_close(exp.output, nt)
    for n in range(2):
        r = reference_l2caf(r3d_tail(model), layer4[n : n + 1], "breakpoint", max_iter=40, check_every=10, min_error=0.0)
        torch.testing.assert_close(exp.maps[n, 0], r["map"], rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# a volumetric CNN at an intermediate block: the generic path, its folds, every backend

VOLUME_CASES = {
    "oblivious": dict(mode="oblivious"),
    "specific": dict(mode="specific", targets=[1, 3]),
    "gauss": dict(mode="oblivious", constraint="gauss", lr=20.0),
}


@pytest.mark.parametrize("case", VOLUME_CASES)
def test_volume_net_intermediate_block_matches_the_oracle(volume_net, case):
    model, volumes = volume_net
    options = dict(VOLUME_CASES[case])
    mode, targets = options.pop("mode"), options.pop("targets", None)
    loop = dict(max_iter=30, check_every=3, **options)
    min_error, runs = oracle_runs(model, volumes, "block1", targets, mode, **loop)
    grid = tuple(capture(model, "block1", volumes)[1].shape[2:])
    assert grid == (4, 6, 6)
    # folded (the tail's Conv3d and BatchNorm3d applied once), the whole tail with the C++ Hadamard
    # filter, and the whole tail in plain torch
    for backend, fused in (("torch", True), ("cpp", False), ("torch", False)):
        exp = caffast.explain(model, volumes, "block1", mode=mode, targets=targets, loss="release", backend=backend,
                              fused=fused, min_error=min_error, **loop)  # fmt: skip
        assert exp.path == "generic" and exp.features.shape == (2, 8, *grid)
        assert_matches(exp, runs, grid)


def test_volume_net_tail_folds_its_conv3d_and_batchnorm3d(volume_net):
    model, volumes = volume_net
    capture_, tail = split(model, "block1", volumes)
    folded = fold_tail(tail.graph_module, capture_.features, tail.captured)
    assert [(s.op, s.folded) for s in folded.steps][:3] == [
        ("conv 3x3x3 s1 p1 d1 g1", True), ("batchnorm", True), ("ReLU", False)]  # fmt: skip
    check_folded(folded, tail, capture_.features)


@pytest.mark.parametrize("layer", ["block1", "block2"])
def test_fast_and_exact_on_volumes(volume_net, layer):
    """solver="fast" lowers the loss from the start; solver="exact" ends at or below the loop's and
    fast's objectives, at block2 (whose head fuses) in closed form with a vanishing projected gradient."""
    model, volumes = volume_net
    common = dict(mode="specific", targets=[2], max_iter=20)
    loop = caffast.explain(model, volumes, layer, **common)
    fast = caffast.explain(model, volumes, layer, solver="fast", **common)
    exact = caffast.explain(model, volumes, layer, solver="exact", **common)
    start = caffast.explain(model, volumes, layer, **{**common, "max_iter": 1})
    assert loop.path == fast.path == exact.path == ("fused" if layer == "block2" else "generic")
    assert (fast.objective < start.objective).all()
    assert (exact.objective <= torch.minimum(loop.objective, fast.objective) + 1e-9).all()
    if layer == "block2":
        assert (exact.gradient_norm < 1e-9).all(), exact.gradient_norm


def test_exact_closed_form_on_r3d18(r3d):
    """The 3-D head's closed form: at or below the loop's objective, a vanishing projected gradient."""
    _, _, truncated, layer3 = r3d
    for mode, targets in (("oblivious", None), ("specific", [1, 4])):
        loop = caffast.explain(truncated, layer3, "layer4", mode=mode, targets=targets, max_iter=200)
        exact = caffast.explain(truncated, layer3, "layer4", mode=mode, targets=targets, solver="exact")
        assert (exact.iterations == 0).all() and exact.path == "fused"
        assert (exact.objective <= loop.objective + 1e-12).all()
        assert (exact.gradient_norm < 1e-10).all()


# ------------------------------------------------------------------------------------------------
# folds of 3-D ops


def check_folded(folded, tail, features, rtol=1e-10):
    """Output and gradient (random cotangent) of the folded tail equal those of the plain tail."""
    generator = torch.Generator().manual_seed(4)
    index = torch.tensor([0, 2, 1, 0])[: len(features) + 1] % len(features)
    g = torch.randn(len(index), *features.shape[2:], dtype=features.dtype, generator=generator).requires_grad_(True)
    reference = tail(features.index_select(0, index) * g[:, None], index)
    output = folded(g, index)
    torch.testing.assert_close(output, reference, rtol=0, atol=rtol * reference.abs().max().item())
    cotangent = torch.randn(reference.shape, dtype=reference.dtype, generator=generator)
    (grad_reference,) = torch.autograd.grad(reference, g, cotangent)
    (grad_output,) = torch.autograd.grad(output, g, cotangent)
    torch.testing.assert_close(grad_output, grad_reference, rtol=0, atol=rtol * grad_reference.abs().max().item())


class Tail3d(nn.Module):
    """A breakpoint (a Conv3d) and a tail given as a function of the module and the breakpoint's output."""

    def __init__(self, fn, **modules):
        super().__init__()
        self.fn = fn
        self.stem = nn.Conv3d(2, 8, 3, padding=1)
        for name, module in modules.items():
            setattr(self, name, module)

    def forward(self, x):
        return self.fn(self, self.stem(x))


FOLDS_3D = {
    "conv-stride-dilation": (lambda m, f: torch.tanh(m.conv(f)), dict(conv=nn.Conv3d(8, 6, 3, 2, 2, 2)), "conv 3x3x3 s2 p2 d2 g1"),
    "conv-groups-1x1x1": (lambda m, f: torch.tanh(m.conv(f)), dict(conv=nn.Conv3d(8, 8, 1, groups=4)), "conv 1x1x1 s1 p0 d1 g4"),
    "conv-anisotropic": (lambda m, f: torch.tanh(m.conv(f)), dict(conv=nn.Conv3d(8, 4, (1, 3, 3), (1, 2, 2), (0, 1, 1))),
                         "conv 1x3x3 s1 p0 d1 g1"),
    "conv3d-function": (lambda m, f: torch.tanh(F.conv3d(f, m.conv.weight, None, 1, "same")), dict(conv=nn.Conv3d(8, 4, 3)),
                        "conv 3x3x3 s1 p1 d1 g1"),
    "batchnorm3d": (lambda m, f: torch.tanh(m.norm(f)), dict(norm=nn.BatchNorm3d(8)), "batchnorm"),
    "adaptive-pool-linear": (lambda m, f: m.fc(m.pool(f).flatten(1)), dict(pool=nn.AdaptiveAvgPool3d(1), fc=nn.Linear(8, 3)),
                             "adaptive pool 1x1x1"),
    "avg-pool-global": (lambda m, f: torch.tanh(m.pool(f)), dict(pool=nn.AvgPool3d((4, 6, 6))), "avg pool (global)"),
    "mean": (lambda m, f: torch.tanh(f.mean(dim=(2, 3, 4))), {}, "mean"),
    "flatten-linear": (lambda m, f: m.fc(f.flatten(1)), dict(fc=nn.Linear(8 * 4 * 6 * 6, 3)), "linear 1152->3"),
}


@pytest.mark.parametrize("case", FOLDS_3D)
def test_3d_ops_fold_exactly(case):
    fn, modules, op = FOLDS_3D[case]
    torch.manual_seed(5)
    model = Tail3d(fn, **modules).double().eval()
    for norm in model.modules():
        if isinstance(norm, nn.BatchNorm3d):
            norm.running_mean.normal_()
            norm.running_var.uniform_(0.5, 1.5)
    inputs = torch.randn(3, 2, 4, 6, 6, dtype=F64)
    capture_, tail = split(model, "stem", inputs)
    folded = fold_tail(tail.graph_module, capture_.features, tail.captured)
    assert op in [s.op for s in folded.folded], folded.report()
    check_folded(folded, tail, capture_.features)


def test_max_pool3d_stops_the_fold():
    model = Tail3d(lambda m, f: m.fc(m.pool(m.norm(f)).flatten(1)), norm=nn.BatchNorm3d(8), pool=nn.MaxPool3d(2),
                   fc=nn.Linear(8 * 2 * 3 * 3, 3)).double().eval()  # fmt: skip
    capture_, tail = split(model, "stem", torch.randn(2, 2, 4, 6, 6, dtype=F64))
    folded = fold_tail(tail.graph_module, capture_.features, tail.captured)
    assert [(s.op, s.folded) for s in folded.steps][:2] == [("batchnorm", True), ("MaxPool3d", False)]
    check_folded(folded, tail, capture_.features)


# ------------------------------------------------------------------------------------------------
# the compiled kernels on a (D, H, W) grid, against their twins


@pytest.mark.parametrize("constraint", ["l2norm", "softmax", "gauss"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_cpp_loop_on_a_volume_grid_matches_the_shared_loop(constraint, optimizer):
    """The C++ loop takes the D * H * W cells flattened; the Gaussian's mean has three coordinates."""
    from caffast.core.heads import FusedHead
    from caffast.core.loop import LoopSettings, solve
    from caffast.core.problems import FusedProblem

    grid, classes = (3, 2, 4), 4
    gen = torch.Generator().manual_seed(6)
    parts = torch.randn(2, 2, classes, 24, generator=gen, dtype=F64)
    gram = torch.einsum("iska,itkb->istab", parts, parts).contiguous()
    head = FusedHead(gram, None, None, torch.tensor([0, 1, 1]), "oblivious", classes, grid)
    kind = as_constraint(constraint)
    shape = (3, *kind.parameter_shape(grid))
    initial = torch.randn(shape, generator=gen, dtype=F64) * (0.5 if constraint == "gauss" else 1.0)
    settings = LoopSettings(max_iter=40, lr=0.5, min_error=0.0, check_every=5, optimizer=optimizer)
    expected = solve(FusedProblem(head, kind), initial, settings)
    params, iterations, loss = cpp.solve_fused(head, kind, initial.reshape(3, -1).contiguous(), settings)
    assert torch.equal(iterations, expected.iterations)
    torch.testing.assert_close(params.view(shape), expected.params, rtol=0, atol=1e-10)
    torch.testing.assert_close(loss, expected.loss, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_hadamard_on_volumes_matches_its_twin(dtype):
    gen = torch.Generator().manual_seed(7)
    features = torch.randn(3, 5, 2, 3, 4, generator=gen).to(dtype)
    filter = torch.randn(3, 2, 3, 4, generator=gen).to(dtype).requires_grad_(True)
    twin = features * F.normalize(filter.flatten(1), dim=1).view_as(filter)[:, None]
    got = cpp.Hadamard.apply(features, filter)
    upstream = torch.randn(features.shape, generator=gen).to(dtype)
    (want,) = torch.autograd.grad((twin * upstream).sum(), filter)
    (have,) = torch.autograd.grad((got * upstream).sum(), filter)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, twin, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(have, want, rtol=tolerance, atol=tolerance)


# ------------------------------------------------------------------------------------------------
# layouts of 5-D maps


class Permute(nn.Module):
    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


def test_swin3d_channels_last_map_is_read_as_its_grid():
    """torchvision's swin3d_t outputs (N, D, H, W, C) at `norm`: the filter multiplies the cells where
    they lie, as on the same network with the map permuted to channels-first at the breakpoint."""
    torch.manual_seed(8)
    swin = torchvision.models.video.swin3d_t(num_classes=4).eval()
    first = copy.deepcopy(swin)
    first.norm = nn.Sequential(OrderedDict(norm=swin.norm, first=Permute(0, 4, 1, 2, 3), marker=nn.Identity(),
                                           last=Permute(0, 2, 3, 4, 1)))  # fmt: skip
    clip = torch.randn(1, 3, 4, 64, 64, generator=torch.Generator().manual_seed(9))
    options = dict(mode="specific", targets=[1], max_iter=15, check_every=5)
    last = caffast.explain(swin, clip, "norm", **options)
    reference = caffast.explain(first, clip, "norm.marker", **options)
    assert last.maps.shape == reference.maps.shape == (1, 1, 2, 2, 2)
    torch.testing.assert_close(last.features, reference.features)
    torch.testing.assert_close(last.maps, reference.maps, rtol=0, atol=1e-6)
    assert torch.equal(last.iterations, reference.iterations)


class Lift(nn.Module):
    """Eight copies of a one-channel volume: a 5-D map that no layer says the layout of."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(1, 8, 1, 1, 1)


def test_an_ambiguous_5d_map_asks_for_its_layout():
    model = nn.Sequential(Lift(), nn.Flatten(1), nn.Linear(8**4, 3)).double()
    volume = torch.randn(2, 1, 8, 8, 8, dtype=F64)
    with pytest.raises(ValueError, match=r"\(2, 8, 8, 8, 8\).*pass layout='ncdhw' or layout='ndhwc'"):
        caffast.explain(model, volume, "0", max_iter=2)
    with pytest.raises(ValueError, match=r"layout='nchw' needs a 4-D output.*pass layout='ncdhw' or 'ndhwc'"):
        caffast.explain(model, volume, "0", layout="nchw", max_iter=2)
    for layout in ("ncdhw", "ndhwc"):
        exp = caffast.explain(model, volume, "0", layout=layout, max_iter=2)
        assert exp.maps.shape == (2, 1, 8, 8, 8) and exp.features.shape == (2, 8, 8, 8, 8)


class Tokens(nn.Module):
    """A clip cut into 2 x 4 x 4 patches, as tokens (N, L, C)."""

    def __init__(self):
        super().__init__()
        self.patches = nn.Conv3d(3, 6, (2, 4, 4), (2, 4, 4))
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.mix(self.patches(x).flatten(2).transpose(1, 2))
        return self.head(tokens.mean(1))


def test_tokens_of_a_clip_need_a_reshape_transform():
    model, clip = Tokens().double(), torch.randn(1, 3, 4, 8, 8, dtype=F64)
    with pytest.raises(ValueError, match=r"tokens of a clip or a volume.*reshape_transform=.*\(N, C, D, H, W\)"):
        caffast.explain(model, clip, "mix", max_iter=2)

    def to_grid(tokens: torch.Tensor) -> torch.Tensor:
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], 2, 2, 2)

    exp = caffast.explain(model, clip, "mix", reshape_transform=to_grid, max_iter=2)
    assert exp.maps.shape == (1, 1, 2, 2, 2) and exp.features.shape == (1, 6, 2, 2, 2)


# ------------------------------------------------------------------------------------------------
# pytorch-grad-cam's 3-D GradCAM beside caffast's CAM front end


def test_cam_front_end_beside_pytorch_grad_cams_3d_gradcam():
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from caffast.cam import L2CAF, GradCAM
    from caffast.eval.gradcam import grad_cam

    torch.manual_seed(10)
    model = _calibrate_batch_norm(VolumeNet(channels=4, classes=3), torch.randn(4, 1, 8, 12, 12))
    volumes = torch.randn(2, 1, 8, 12, 12, generator=torch.Generator().manual_seed(11))
    targets = [ClassifierOutputTarget(1), ClassifierOutputTarget(2)]
    with pgc.GradCAM(model=model, target_layers=[model.block2]) as theirs:
        full = theirs(input_tensor=volumes, targets=targets)
        activations = theirs.activations_and_grads.activations[0]
        gradients = theirs.activations_and_grads.gradients[0]
        raw = theirs.get_cam_image(volumes, model.block2, targets, activations.numpy(), gradients.numpy())
    ours = grad_cam(model, volumes, "block2", [[1], [2]]).maps[:, 0]  # at the layer's (4, 6, 6) grid
    torch.testing.assert_close(ours, torch.from_numpy(np.maximum(raw, 0)), rtol=1e-4, atol=1e-6)
    drop_in = GradCAM(model, [model.block2])(volumes, targets)
    assert drop_in.shape == full.shape == (2, 8, 12, 12) and drop_in.dtype == np.float32
    assert drop_in.min() == 0 and drop_in.max() == 1
    # pytorch-grad-cam resizes with scipy's cubic spline zoom, caffast trilinearly: the same maps, smoothed alike
    assert np.corrcoef(drop_in.ravel(), full.ravel())[0, 1] > 0.9
    maps = L2CAF(model, [model.block2], max_iter=20)(volumes, targets)
    assert maps.shape == (2, 8, 12, 12) and maps.min() >= 0 and maps.max() <= 1


# ------------------------------------------------------------------------------------------------
# maps at the input's size, and pictures


def test_upsample_resizes_trilinearly_and_scales_each_map(r3d):
    _, _, truncated, layer3 = r3d
    exp = caffast.explain(truncated, layer3, "layer4", mode="specific", targets=[0, 5], max_iter=5)
    heat = exp.upsample((16, 32, 32))
    resized = F.interpolate(exp.maps.flatten(0, 1)[:, None], size=(16, 32, 32), mode="trilinear", align_corners=False)
    resized = resized.view(2, 2, 16, 32, 32)
    low, high = resized.amin(dim=(2, 3, 4), keepdim=True), resized.amax(dim=(2, 3, 4), keepdim=True)
    torch.testing.assert_close(heat, (resized - low) / (high - low))
    assert exp.upsample(8).shape == (2, 2, 8, 8, 8)
    with pytest.raises(ValueError, match=r"size \(32, 32\) has 2 axes; the maps' grid \(2, 2, 2\) has 3"):
        exp.upsample((32, 32))


def test_pictures_of_a_clip(tmp_path):
    from PIL import Image

    generator = torch.Generator().manual_seed(12)
    clip = torch.rand(3, 6, 10, 12, generator=generator)  # (C, D, H, W) in [0, 1]
    heatmap = torch.rand(3, 5, 6, generator=generator)
    frames = viz.overlay_frames(clip, heatmap, alpha=0.6)
    assert len(frames) == 6 and frames[0].size == (12, 10)
    scaled = viz.scale_volume_map(heatmap, (6, 10, 12))
    assert scaled.min() == 0 and scaled.max() == 1  # over the whole clip, not per frame
    resized = F.interpolate(heatmap[None, None].double(), size=(6, 10, 12), mode="trilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(torch.from_numpy(scaled), (resized - resized.min()) / (resized.max() - resized.min()))
    rgb = clip.permute(1, 2, 3, 0).double().numpy()
    expected = 0.6 * viz.apply_colormap(scaled[4]) + 0.4 * rgb[4]
    assert np.array_equal(np.asarray(frames[4]), np.round(np.clip(expected, 0, 1) * 255).astype(np.uint8))

    viz.save_clip_gif(clip, heatmap, tmp_path / "clip.gif", duration_ms=50)
    assert Image.open(tmp_path / "clip.gif").n_frames == 6

    sagittal = viz.overlay_frames(clip[0], heatmap, axis="sagittal")  # a grey (D, H, W) volume
    assert len(sagittal) == 12 and sagittal[0].size == (10, 6)
    sheet = viz.montage(clip, heatmap, slices=4, columns=2, gap=1, save=tmp_path / "montage.png")
    assert sheet.size == (25, 21) and Image.open(tmp_path / "montage.png").size == (25, 21)
    tiles = np.asarray(sheet)
    assert np.array_equal(tiles[:10, :12], np.asarray(frames[0])) and np.array_equal(tiles[11:, 13:], np.asarray(frames[5]))
    assert (tiles[10] == 255).all() and (tiles[:, 12] == 255).all()  # the white gap between tiles
    with pytest.raises(ValueError, match=r"indices in \[0, 6\)"):
        viz.montage(clip, heatmap, slices=[0, 6])
    with pytest.raises(ValueError, match="axis"):
        viz.overlay_frames(clip, heatmap, axis=3)


def test_every_map_kind_and_a_callable_target_on_clips(r3d):
    """map="positive" and "signed" renormalize over all D * H * W cells; a callable target takes the
    generic path and raises its own score, as the class it names does under loss="logit"."""
    _, _, truncated, layer3 = r3d
    options = dict(mode="specific", max_iter=30, check_every=10)
    signed = caffast.explain(truncated, layer3, "layer4", targets=[3], map="signed", **options)
    positive = caffast.explain(truncated, layer3, "layer4", targets=[3], map="positive", **options)
    unit = signed.filters / torch.linalg.vector_norm(signed.filters, dim=(2, 3, 4), keepdim=True)
    torch.testing.assert_close(signed.maps, unit)
    kept = unit.clamp_min(0)
    torch.testing.assert_close(positive.maps, kept / torch.linalg.vector_norm(kept, dim=(2, 3, 4), keepdim=True))

    def logit_3(output: torch.Tensor) -> torch.Tensor:
        return output[3]

    scored = caffast.explain(truncated, layer3, "layer4", targets=[logit_3], **options)
    by_class = caffast.explain(truncated, layer3, "layer4", targets=[3], loss="logit", **options)
    assert scored.path == "generic" and by_class.path == "fused"
    torch.testing.assert_close(scored.maps, by_class.maps, rtol=0, atol=1e-9)
