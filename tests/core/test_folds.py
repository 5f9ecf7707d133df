"""Folded tails equal the original tails (float64), outputs and gradients wrt the filter."""

from __future__ import annotations


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from caffast.core.breakpoints import split
from caffast.core.folds import fold_tail



N_IMAGES = 3
INDEX = torch.tensor([0, 2, 1, 1, 0])  # 5 problems, repeated images


class Body(nn.Module):
    """The tail of a test model: fn(self, f, a), f the breakpoint's output, a a value before it."""

    def __init__(self, fn, **modules):
        super().__init__()
        self.fn = fn
        for name, module in modules.items():
            setattr(self, name, module)

    def forward(self, f, a):
        return self.fn(self, f, a)


class Net(nn.Module):
    def __init__(self, body: Body, channels: int = 8):
        super().__init__()
        self.pre = nn.Conv2d(3, channels, 3, padding=1)
        self.stem = nn.Conv2d(channels, channels, 3, padding=1)  # the breakpoint
        self.body = body

    def forward(self, x):
        a = self.pre(x)
        return self.body(self.stem(a), a)


def _randomize(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
                if module.weight is not None:
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator))
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator))


def check_folded(folded, tail, features, index=INDEX, rtol=1e-10):
    """Output and gradient (random cotangent) of the folded tail equal those of the plain tail."""
    generator = torch.Generator().manual_seed(2)
    g = torch.randn(len(index), *features.shape[2:], dtype=features.dtype, generator=generator)
    g.requires_grad_(True)
    reference = tail(features.index_select(0, index) * g[:, None], index)
    output = folded(g, index)
    assert output.shape == reference.shape
    scale = reference.abs().max().clamp_min(1e-30)
    assert (output - reference).abs().max() <= rtol * scale, (output - reference).abs().max() / scale
    cotangent = torch.randn(reference.shape, dtype=reference.dtype, generator=generator)
    (grad_reference,) = torch.autograd.grad(reference, g, cotangent)
    (grad_output,) = torch.autograd.grad(output, g, cotangent)
    gscale = grad_reference.abs().max().clamp_min(1e-30)
    assert (grad_output - grad_reference).abs().max() <= rtol * gscale


def run(fn, size=8, channels=8, budget=None, params=None, **modules):
    """Split a test model at its stem, fold its tail and check it; `params`: tensors of the body."""
    torch.manual_seed(0)
    body = Body(fn, **modules)
    for name, value in (params or {}).items():
        body.register_buffer(name, value)
    model = Net(body, channels).double().eval()
    _randomize(model)
    images = torch.randn(N_IMAGES, 3, size, size, dtype=torch.float64)
    capture, tail = split(model, "stem", images)
    assert tail.kind == "fx"
    kwargs = {} if budget is None else {"budget": budget}
    folded = fold_tail(tail.graph_module, capture.features, tail.captured, **kwargs)
    check_folded(folded, tail, capture.features)
    return folded


def folded_ops(folded) -> list[str]:
    return [s.op for s in folded.folded]


# --- convolutions ------------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_conv1x1(stride, groups, bias):
    folded = run(lambda m, f, a: F.relu(m.conv(f)), size=9, conv=nn.Conv2d(8, 16, 1, stride, groups=groups, bias=bias))
    assert folded_ops(folded) == [f"conv 1x1 s{stride} p0 d1 g{groups}"]


@pytest.mark.parametrize("kernel, stride, padding, dilation", [
    (3, 1, 1, 1), (3, 1, 0, 1), (3, 2, 1, 1), (3, 1, 2, 2), (5, 2, 2, 1), ((3, 1), 1, (1, 0), 1),
    (2, 2, 0, 1), (3, 2, 3, 3), (7, 1, 3, 1), (3, 1, "same", 2),
])
@pytest.mark.parametrize("groups", [1, 4, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_kxk(kernel, stride, padding, dilation, groups, bias):
    if padding == "same" and stride != 1:
        pytest.skip("'same' needs stride 1")
    conv = nn.Conv2d(8, 8, kernel, stride, padding, dilation, groups=groups, bias=bias)
    folded = run(lambda m, f, a: torch.tanh(m.conv(f)), size=9, conv=conv)
    assert len(folded.folded) == 1 and folded.folded[0].op.startswith("conv")


def test_conv_functional():
    def fn(m, f, a):
        return F.relu(F.conv2d(f, m.weight, m.bias, 2, 1, 1, 2))
    folded = run(fn, size=8, params={"weight": torch.randn(6, 4, 3, 3), "bias": torch.randn(6)})
    assert folded_ops(folded) == ["conv 3x3 s2 p1 d1 g2"]


def test_stacked_convs_merge_terms():
    def fn(m, f, a):
        return F.relu(m.c2(m.bn(m.c1(f))))
    folded = run(fn, size=10, c1=nn.Conv2d(8, 8, 3, padding=1), bn=nn.BatchNorm2d(8), c2=nn.Conv2d(8, 8, 3, padding=1))
    assert len(folded.folded) == 3
    assert "25 terms" in folded.folded[-1].detail  # a 5 x 5 window of placements, not 81 terms


def test_strided_then_kxk():
    def fn(m, f, a):
        return torch.sigmoid(m.c2(m.c1(f)))
    folded = run(fn, size=11, c1=nn.Conv2d(8, 6, 1, stride=2), c2=nn.Conv2d(6, 5, 3, stride=2, padding=1, dilation=1))
    assert len(folded.folded) == 2


def test_conv_then_pool_then_linear():
    def fn(m, f, a):
        return F.relu(m.fc(torch.flatten(m.pool(m.c(f)), 1)))
    folded = run(fn, size=7, c=nn.Conv2d(8, 12, 3, padding=1, stride=2), pool=nn.AdaptiveAvgPool2d(1), fc=nn.Linear(12, 5))
    assert folded_ops(folded)[-1] == "linear 12->5"


# --- normalization, constants, residuals --------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm(affine):
    folded = run(lambda m, f, a: F.relu(m.bn(f)), bn=nn.BatchNorm2d(8, affine=affine))
    assert folded_ops(folded) == ["batchnorm"]


def test_residual_add_captured():
    def fn(m, f, a):
        return F.relu(m.bn(m.c(f)) + m.proj(a))
    folded = run(fn, c=nn.Conv2d(8, 8, 3, padding=1), bn=nn.BatchNorm2d(8), proj=nn.Conv2d(8, 8, 1))
    assert folded_ops(folded) == ["conv 3x3 s1 p1 d1 g1", "batchnorm", "add constant"]
    assert folded.captured == []  # the captured residual became the constant of the folded value


def test_residual_add_identity_and_branches():
    def fn(m, f, a):
        y = m.c1(f) + m.c2(f)  # two affine values
        z = y - f  # and the breakpoint itself
        return torch.tanh(z + a)  # and a captured value
    folded = run(fn, c1=nn.Conv2d(8, 8, 3, padding=1), c2=nn.Conv2d(8, 8, 1))
    assert folded_ops(folded) == ["conv 3x3 s1 p1 d1 g1", "conv 1x1 s1 p0 d1 g1", "add", "sub", "add constant"]


def test_constants():
    def fn(m, f, a):
        y = 2.5 * m.c(f) / 3.0
        y = -y + 1.0
        y = 4.0 - y
        y = y * m.scale + m.shift
        y = y * a.mean(1, keepdim=True)  # a per-image constant
        return torch.sigmoid(y)
    params = {"scale": torch.randn(8, 1, 1), "shift": torch.randn(1, 8, 8, 8)}
    folded = run(fn, c=nn.Conv2d(8, 8, 1), params=params)
    assert len(folded.folded) == 9


def test_constant_that_broadcasts_stops():
    folded = run(lambda m, f, a: torch.relu(m.pool(f) + m.grid), pool=nn.AdaptiveAvgPool2d(1), params={"grid": torch.randn(8, 8, 8)})
    assert folded_ops(folded) == ["adaptive pool 1x1"]


def test_dropout_identity():
    folded = run(lambda m, f, a: F.relu(m.i(m.d(m.d2(f)))), d=nn.Dropout(0.5), d2=nn.Dropout(0.3, inplace=True), i=nn.Identity())
    assert len(folded.folded) == 3


# --- concatenation -----------------------------------------------------------------------------


def test_concat_branches_and_captured():
    def fn(m, f, a):
        y = torch.cat([m.c1(f), f, a, m.c2(f)], 1)
        return F.relu(m.bn(y))
    folded = run(fn, c1=nn.Conv2d(8, 4, 1, bias=False), c2=nn.Conv2d(8, 3, 1), bn=nn.BatchNorm2d(23))
    assert folded_ops(folded)[-2:] == ["cat", "batchnorm"]


def test_concat_of_different_placements():
    """Blocks with different placement keys are zero-padded per key: that does not pay, the cat stays."""
    def fn(m, f, a):
        return F.relu(m.bn(torch.cat([m.c1(f), m.c2(f)], 1)))
    folded = run(fn, c1=nn.Conv2d(8, 2, 3, padding=1), c2=nn.Conv2d(8, 40, 1), bn=nn.BatchNorm2d(42))
    assert "cat" not in folded_ops(folded) and len(folded.frontier) == 2
    # equal keys (two strided 1 x 1 convolutions) concatenate without padding
    def fn2(m, f, a):
        return F.relu(torch.cat([m.c1(f), m.c2(f)], 1))
    folded = run(fn2, c1=nn.Conv2d(8, 2, 1, stride=2), c2=nn.Conv2d(8, 5, 1, stride=2))
    assert folded_ops(folded)[-1] == "cat"


def test_concat_pooled():
    def fn(m, f, a):
        y = torch.cat([f.mean((2, 3)), m.c(f).mean((2, 3))], 1)
        return F.relu(m.fc(y))
    folded = run(fn, c=nn.Conv2d(8, 4, 3, padding=1), fc=nn.Linear(12, 3))
    assert folded_ops(folded)[-1] == "linear 12->3"


# --- pooling, flatten, Linear ------------------------------------------------------------------


POOLS = {
    "adaptive module": lambda m, f: torch.flatten(m.pool(f), 1),
    "mean": lambda m, f: f.mean((2, 3)),
    "mean keepdim neg dims": lambda m, f: torch.mean(f, dim=(-1, -2), keepdim=True).flatten(1),
    "avg_pool2d": lambda m, f: F.avg_pool2d(f, 6).flatten(1),
    "adaptive functional": lambda m, f: F.adaptive_avg_pool2d(f, (1, 1)).flatten(1),
    "AvgPool2d module": lambda m, f: m.avg(f).flatten(1),
}


@pytest.mark.parametrize("pool", list(POOLS))
def test_global_pool_head(pool):
    fn = POOLS[pool]
    folded = run(lambda m, f, a: F.relu(m.fc(fn(m, f))), size=6, pool=nn.AdaptiveAvgPool2d(1), avg=nn.AvgPool2d(6), fc=nn.Linear(8, 4))
    assert folded_ops(folded)[-1] == "linear 8->4"
    assert [s for s in folded.steps if not s.folded][0].op in ("relu",)


def test_vgg_like_classifier():
    """AdaptiveAvgPool2d((7, 7)) on a 7 x 7 grid, flatten, Linear over C*H*W, then a ReLU."""
    def fn(m, f, a):
        return m.fc2(F.relu(m.fc1(m.drop(torch.flatten(m.pool(f), 1)))))
    folded = run(fn, size=7, pool=nn.AdaptiveAvgPool2d((7, 7)), drop=nn.Dropout(), fc1=nn.Linear(8 * 49, 16), fc2=nn.Linear(16, 3))
    assert folded_ops(folded) == ["adaptive pool (identity)", "flatten", "dropout", "linear 392->16"]


def test_flatten_linear_after_kxk():
    """A Linear over the flattened output of a padded, strided convolution (terms partly outside)."""
    def fn(m, f, a):
        return torch.tanh(m.fc(m.c(f).flatten(1)))
    folded = run(fn, size=7, c=nn.Conv2d(8, 4, 3, stride=2, padding=1), fc=nn.Linear(4 * 16, 5))
    assert folded_ops(folded)[-1] == "linear 64->5"


def test_fully_folded_head():
    folded = run(lambda m, f, a: m.fc(torch.flatten(m.pool(f), 1)), pool=nn.AdaptiveAvgPool2d(1), fc=nn.Linear(8, 4))
    assert len(folded.rest.graph.nodes) == 2  # placeholder -> output


def test_keyword_and_positional_forms():
    """Arguments are read by parameter name, however the call passes them."""
    def fn(m, f, a):
        y = torch.cat(tensors=[m.c(f), a], dim=1)
        z = torch.flatten(F.adaptive_avg_pool2d(y, output_size=1), 1, -1)
        return F.relu(F.linear(input=z, weight=m.weight))
    folded = run(fn, c=nn.Conv2d(8, 4, 1), params={"weight": torch.randn(5, 12)})
    assert folded_ops(folded) == ["conv 1x1 s1 p0 d1 g1", "cat", "adaptive pool 1x1", "flatten", "linear 12->5"]


def test_permute_pooled():
    def fn(m, f, a):
        y = m.pool(f).permute(0, 2, 3, 1)
        return F.layer_norm(y, (8,)).flatten(1)
    folded = run(fn, pool=nn.AdaptiveAvgPool2d(1))
    assert folded_ops(folded) == ["adaptive pool 1x1", "permute"]
    folded = run(lambda m, f, a: F.layer_norm(m.pool(f).permute(dims=(0, 2, 3, 1)), (8,)).flatten(1), pool=nn.AdaptiveAvgPool2d(1))
    assert folded_ops(folded) == ["adaptive pool 1x1", "permute"]


# --- where folding stops -----------------------------------------------------------------------


def test_stops_at_nonlinear_ops():
    def fn(m, f, a):
        y = m.c(f)
        z = y * m.c2(f)  # product of two filtered values
        w = F.max_pool2d(m.c3(f), 2)
        return torch.cat([z.flatten(1), w.flatten(1)], 1)
    folded = run(fn, c=nn.Conv2d(8, 4, 1), c2=nn.Conv2d(8, 4, 1), c3=nn.Conv2d(8, 4, 1))
    stopped = {s.op for s in folded.steps if not s.folded}
    assert "mul" in stopped and "max_pool2d" in stopped
    assert len(folded.frontier) == 3


def test_in_place_mutation_respected():
    def fn(m, f, a):
        y = m.c(f)
        r = F.relu(y, inplace=True)  # mutates y
        return r + (y + 1.0).sum((2, 3), keepdim=True)  # sees the mutated y
    folded = run(fn, c=nn.Conv2d(8, 4, 1))
    assert folded_ops(folded) == ["conv 1x1 s1 p0 d1 g1"]


def test_budget_refuses():
    folded = run(lambda m, f, a: F.relu(m.c(f)), size=8, budget=100, c=nn.Conv2d(8, 8, 3, padding=1))
    assert folded.folded == [] and "budget" in folded.steps[0].detail


def test_shape_queries_stop():
    folded = run(lambda m, f, a: m.fc(m.pool(f).view(f.size(0), -1)), pool=nn.AdaptiveAvgPool2d(1), fc=nn.Linear(8, 3))
    assert folded_ops(folded) == ["adaptive pool 1x1"]


def test_arguments_a_rule_does_not_read_stop():
    """A keyword the op's signature lacks (alpha, dtype) leaves the call unfolded."""
    folded = run(lambda m, f, a: F.relu(torch.add(m.c(f), a, alpha=2)), c=nn.Conv2d(8, 8, 1))
    assert folded_ops(folded) == ["conv 1x1 s1 p0 d1 g1"]
    assert folded.steps[-1].detail == "add call form"
    folded = run(lambda m, f, a: F.relu(f.mean((2, 3), dtype=torch.float64)))
    assert folded.folded == [] and folded.steps[0].detail == ".mean() call form"


class UntraceableConv(nn.Conv2d):
    """A Conv2d whose forward fx cannot trace (and that is not a plain convolution)."""

    def forward(self, x):
        if x.sum() > -1e30:  # data-dependent control flow
            return super().forward(x) * 2
        return x


def test_subclass_of_a_folded_module_stays_unfolded():
    """A module class from outside torch.nn is a single call in the tail whose forward may differ from
    its base class's: it is not folded as its base class."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), UntraceableConv(8, 8, 1), nn.ReLU()).double().eval()
    images = torch.randn(N_IMAGES, 3, 8, 8, dtype=torch.float64)
    capture, tail = split(model, "0", images)
    assert tail.kind == "fx"
    folded = fold_tail(tail.graph_module, capture.features, tail.captured)
    assert folded.folded == [] and folded.steps[0].op == "UntraceableConv"
    check_folded(folded, tail, capture.features)


def test_float32_close():
    torch.manual_seed(0)
    model = Net(Body(lambda m, f, a: F.relu(m.c(f)), c=nn.Conv2d(8, 8, 3, padding=1))).eval()
    images = torch.randn(N_IMAGES, 3, 8, 8)
    capture, tail = split(model, "stem", images)
    folded = fold_tail(tail.graph_module, capture.features, tail.captured)
    check_folded(folded, tail, capture.features, rtol=1e-5)


# --- real tails ---------------------------------------------------------------------------------

REAL = [
    ("vgg16", "features", 224, 3),
    ("mobilenet_v3_large", "features", 64, 3),
    ("convnext_tiny", "features", 64, 2),
    ("resnet50", "layer3", 64, 4),
    ("resnet50", "layer4.1", 64, 2),
    ("efficientnet_b0", "features.5", 64, 2),
    ("densenet121", "features.denseblock3", 64, 1),
]


@pytest.mark.parametrize("name, layer, size, n_folded", REAL, ids=[f"{n}-{l}" for n, l, _, _ in REAL])
def test_real_tails(name, layer, size, n_folded):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    _randomize(model)
    capture, tail = split(model, layer, torch.randn(2, 3, size, size))  # float32 split, float64 check
    assert tail.kind == "fx"
    model.double()
    tail.graph_module.double()
    features = torch.randn(capture.features.shape, dtype=torch.float64)
    captured = [c.double() for c in tail.captured]
    folded = fold_tail(tail.graph_module, features, captured)
    assert len(folded.folded) == n_folded, folded.report()

    class Plain:
        def __call__(self, filtered, index):
            return tail.graph_module(filtered, *(c.index_select(0, index) for c in captured))

    check_folded(folded, Plain(), features, index=torch.tensor([0, 1, 1]))
