"""Parity of caffast's public API with an independent oracle (tests/reference_loop.py).

Every (image, target) pair solved by ``caffast.explain`` in a batch must equal the official
reference loop run on that pair alone: same map (1e-5), same number of iterations (exactly).
Models are float64 torchvision nets with random weights; BatchNorm running statistics are set
from one batch of random images so that activations have unit scale (with the raw random init
some nets, e.g. googlenet / mobilenet_v2, have vanishing activations and the problem is void).
vgg11's two 4096-wide hidden layers are narrowed to 64 (same module types and structure:
AdaptiveAvgPool2d(7) -> flatten -> Linear/ReLU/Dropout x2 -> Linear): the 25088 x 4096 float64
matrix alone made every oracle iteration several times slower.
Small images and few iterations keep it fast; the stopping rule is exercised by choosing
min_error from the oracle's own loss history (see _calibrated).
"""

import math
import os
import sys
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_loop import (  # noqa: E402
    gaussian_multiplier,
    min_check_delta,
    polynomial_lr_decay as ref_poly,
    reference_l2caf,
)

import caffast  # noqa: E402


def explain(*args, **kwargs):
    """caffast.explain with the release's class-specific loss, the one the reference loop computes."""
    return caffast.explain(*args, loss="release", **kwargs)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread for both the oracle and the library here.  Every tensor in these tests
    is small: two OpenMP threads were slower in every case measured on the 2-core machine
    (1.2x idle, 3x to 10x when the cores are shared with another process).  Overrides
    conftest's 2 for this module only."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


NUM_CLASSES = 12
MAP_ATOL = 1e-5


# ----------------------------------------------------------------------------------------------
# shared fixtures / helpers
# ----------------------------------------------------------------------------------------------

def _build(name, calib_hw):
    torch.manual_seed(zlib.crc32(name.encode()) % 10_000)
    if name == "googlenet":
        model = torchvision.models.googlenet(num_classes=NUM_CLASSES, aux_logits=False,
                                             init_weights=True)
    else:
        model = getattr(torchvision.models, name)(num_classes=NUM_CLASSES)
    if name == "vgg11":
        model.classifier[0] = torch.nn.Linear(512 * 7 * 7, 64)
        model.classifier[3] = torch.nn.Linear(64, 64)
        model.classifier[6] = torch.nn.Linear(64, NUM_CLASSES)
    model = model.double()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one batch sets the statistics
    if bns:
        model.train()
        with torch.no_grad():
            model(torch.randn(8, 3, *calib_hw, dtype=torch.float64))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def get_model():
    cache = {}

    def get(name, calib_hw=(64, 80)):
        if name not in cache:
            cache[name] = _build(name, calib_hw)
        return cache[name]

    return get


@pytest.fixture
def gen(request):
    """A generator seeded from the test id: fresh images per test, reproducible across runs."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def rand_images(gen, n, hw):
    return torch.randn((n, 3, *hw), generator=gen, dtype=torch.float64)


def rand_classes(gen, k):
    return [int(c) for c in torch.randperm(NUM_CLASSES, generator=gen)[:k]]


def normal_init(seed, n, t, shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, t, *shape), generator=g, dtype=torch.float64)


def oracle(*args, **kw):
    """reference_l2caf on one thread: its tensors are tiny (one image), and intra-op threads only
    add overhead there (and thrash badly when the 2 cores are shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return reference_l2caf(*args, **kw)
    finally:
        torch.set_num_threads(before)


def solve_all(model, images, layer, targets, mode, inits=None, **kw):
    """Oracle for every (n, t): targets is an (N, T) list of lists (None entries for oblivious)."""
    refs = []
    for n in range(images.shape[0]):
        row = []
        for t, target in enumerate(targets[n]):
            init = None if inits is None else inits[n, t]
            row.append(oracle(model, images[n:n + 1], layer, target, mode=mode, init=init, **kw))
        refs.append(row)
    return refs


def assert_parity(exp, refs, model, images, max_iter, constraint="l2norm", check_targets=True):
    N, T = len(refs), len(refs[0])
    H, W = refs[0][0]["A"].shape[-2:]
    assert tuple(exp.maps.shape) == (N, T, H, W)
    assert tuple(exp.filters.shape) == (N, T, H, W)
    pshape = (2,) if constraint == "gauss" else (H, W)
    assert tuple(exp.parameters.shape) == (N, T, *pshape)
    assert tuple(exp.iterations.shape) == (N, T)
    assert tuple(exp.loss.shape) == (N, T)
    assert exp.tail in ("fx", "hook", "fused")
    with torch.no_grad():
        out = model(images)
    torch.testing.assert_close(torch.as_tensor(exp.output).double(), out, rtol=1e-6, atol=1e-8)
    problems = []
    for n in range(N):
        for t in range(T):
            r = refs[n][t]
            tag = f"(n={n}, t={t}, target={r['target']})"
            it = int(exp.iterations[n, t])
            if it != r["iterations"]:
                problems.append(f"{tag}: iterations {it} != oracle {r['iterations']}"
                                f" (max_iter {max_iter}, oracle history {r['history']})")
            mdiff = (exp.maps[n, t].double() - r["map"]).abs().max().item()
            if not mdiff <= MAP_ATOL:
                problems.append(f"{tag}: map max|diff| {mdiff:.3g} > {MAP_ATOL}")
            fdiff = (exp.filters[n, t].double() - r["filter"]).abs().max().item()
            fscale = 1.0 + r["filter"].abs().max().item()
            if not fdiff <= 1e-5 * fscale:
                problems.append(f"{tag}: filter max|diff| {fdiff:.3g}")
            pdiff = (exp.parameters[n, t].double() - r["param"]).abs().max().item()
            pscale = 1.0 + r["param"].abs().max().item()
            if not pdiff <= 1e-5 * pscale:
                problems.append(f"{tag}: parameter max|diff| {pdiff:.3g}")
            lval = float(exp.loss[n, t])
            if not abs(lval - r["loss"]) <= 1e-6 * (1.0 + abs(r["loss"])):
                problems.append(f"{tag}: loss {lval!r} != oracle {r['loss']!r}")
            if check_targets and r["target"] is not None:
                if int(exp.targets[n, t]) != int(r["target"]):
                    problems.append(f"{tag}: targets[n, t] = {int(exp.targets[n, t])}")
            # the oracle's NT (one image at a time) is the model output of that image
            torch.testing.assert_close(r["NT"][0], out[n], rtol=1e-9, atol=1e-12)
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------------------------
# 1. architectures x breakpoints x modes
# ----------------------------------------------------------------------------------------------

LAST, MID = (64, 80), (32, 48)   # non-square inputs: (2, 3) grids at stride 32 / stride 16
ARCH_LAYERS = [
    ("resnet18", "layer4", LAST),
    ("resnet18", "layer3.1.conv1", MID),    # inside a BasicBlock: the skip crosses the breakpoint
    ("resnet50", "layer4", LAST),
    ("resnet50", "layer3", MID),
    ("googlenet", "inception5b", LAST),
    ("googlenet", "inception4e", MID),
    ("densenet121", "features", LAST),
    ("densenet121", "features.denseblock3", MID),
    ("mobilenet_v2", "features", LAST),
    ("mobilenet_v2", "features.14", LAST),  # stride 32 already
    ("vgg11", "features", LAST),
    ("vgg11", "features.10", MID),          # after the 3rd max-pool: (4, 6)
]
ARCH_KW = dict(max_iter=8, lr=0.5, check_every=3)   # checks at 0, 3, 6: stops give 4 or 7


@pytest.mark.parametrize("mode", ["oblivious", "specific"])
@pytest.mark.parametrize("arch,layer,hw", ARCH_LAYERS, ids=[f"{a}-{n}" for a, n, _ in ARCH_LAYERS])
def test_arch_parity(get_model, gen, arch, layer, hw, mode):
    model = get_model(arch)
    images = rand_images(gen, 2, hw)
    if mode == "specific":
        cls = rand_classes(gen, 1)[0]
        targets, targets_arg = [[cls], [cls]], cls
    else:
        targets, targets_arg = [[None], [None]], None
    m, refs, _ = _calibrated(model, images, layer, targets, mode, **ARCH_KW)
    exp = explain(model, images, layer, mode=mode, targets=targets_arg, min_error=m,
                          **ARCH_KW)
    assert_parity(exp, refs, model, images, ARCH_KW["max_iter"])


# ----------------------------------------------------------------------------------------------
# 2. batches of images x classes; the stopping rule per problem
# ----------------------------------------------------------------------------------------------

BATCH_HW = (64, 64)          # resnet18: layer4 (2, 2), layer3 (4, 4)
SMALL_HW = (32, 48)          # resnet18: layer3 (2, 3)
BATCH_KW = dict(max_iter=16, lr=0.5, check_every=4)   # checks at 0, 4, 8, 12


def _calibrated(model, images, layer, targets, mode, inits=None, **kw):
    """Pick a min_error that makes some problems stop early and others run to max_iter.

    The oracle first runs every problem with min_error=0 (no stop) and records the loss at each
    check.  Under min_error m a problem stops at its first check whose |loss_i - loss_prev| < m,
    so m is put in a wide gap (ratio > 1.1, far from any rounding tie) of the sorted check deltas,
    preferring a gap that splits the problems into stopping / not stopping.  Problems that do not
    stop under m do exactly the same computation as with min_error=0 (min_error only decides the
    break); the ones that stop are solved again by the oracle with min_error=m.
    Returns (m, refs, mixed).
    """
    full = solve_all(model, images, layer, targets, mode, inits=inits, min_error=0.0, **kw)
    flat = [r for row in full for r in row]
    mins = [min_check_delta(r["history"]) for r in flat]
    deltas = sorted({abs(y[1] - x[1]) for r in flat
                     for x, y in zip(r["history"], r["history"][1:])} - {0.0})
    best = None  # (score, ratio, m)
    for a, b in zip(deltas, deltas[1:]):
        if b / a <= 1.1:
            continue
        m = math.sqrt(a * b)
        stops = sum(md < m for md in mins)
        score = 2 if 0 < stops < len(flat) else (1 if stops else 0)
        if best is None or (score, b / a) > best[:2]:
            best = (score, b / a, m)
    m = best[2] if best is not None else 0.0
    refs = []
    for n, row in enumerate(full):
        new = []
        for t, r in enumerate(row):
            if min_check_delta(r["history"]) < m:
                r = oracle(model, images[n:n + 1], layer, targets[n][t], mode=mode,
                           init=None if inits is None else inits[n, t], min_error=m, **kw)
                assert r["iterations"] < kw["max_iter"]
            new.append(r)
        refs.append(new)
    mixed = best is not None and best[0] == 2
    return m, refs, mixed


def _assert_mixed_stops(refs, exp, max_iter, mixed):
    its = [r["iterations"] for row in refs for r in row]
    assert mixed, its
    assert min(its) < max_iter, its          # an early stop really happened
    assert max(its) == max_iter, its         # and some problem ran to the end
    lib = exp.iterations.reshape(-1).tolist()
    assert min(lib) < max_iter and max(lib) == max_iter, lib


def test_batch_targets_list(get_model, gen):
    model = get_model("resnet18")
    images = rand_images(gen, 3, BATCH_HW)
    a, b = rand_classes(gen, 2)
    targets = [[a, b]] * 3
    m, refs, mixed = _calibrated(model, images, "layer4", targets, "specific", **BATCH_KW)
    exp = explain(model, images, "layer4", mode="specific", targets=[a, b],
                          min_error=m, **BATCH_KW)
    assert tuple(exp.targets.shape) == (3, 2)
    assert_parity(exp, refs, model, images, BATCH_KW["max_iter"])
    _assert_mixed_stops(refs, exp, BATCH_KW["max_iter"], mixed)


def test_batch_targets_tensor(get_model, gen):
    model = get_model("resnet18")
    images = rand_images(gen, 3, (64, 80))
    tt = torch.stack([torch.randperm(NUM_CLASSES, generator=gen)[:2] for _ in range(3)])
    targets = tt.tolist()
    m, refs, mixed = _calibrated(model, images, "layer4", targets, "specific", **BATCH_KW)
    exp = explain(model, images, "layer4", mode="specific", targets=tt,
                          min_error=m, **BATCH_KW)
    assert torch.equal(torch.as_tensor(exp.targets).long(), tt.long())
    assert_parity(exp, refs, model, images, BATCH_KW["max_iter"])
    _assert_mixed_stops(refs, exp, BATCH_KW["max_iter"], mixed)


def test_oblivious_mixed_stops(get_model, gen):
    model = get_model("resnet18")
    images = rand_images(gen, 3, SMALL_HW)
    targets = [[None]] * 3
    m, refs, mixed = _calibrated(model, images, "layer3.1.conv1", targets, "oblivious", **BATCH_KW)
    exp = explain(model, images, "layer3.1.conv1", mode="oblivious", min_error=m,
                          **BATCH_KW)
    assert_parity(exp, refs, model, images, BATCH_KW["max_iter"])
    _assert_mixed_stops(refs, exp, BATCH_KW["max_iter"], mixed)


def test_runs_to_max_iter_with_zero_min_error(get_model, gen):
    model = get_model("resnet18")
    images = rand_images(gen, 2, BATCH_HW)
    a, b = rand_classes(gen, 2)
    kw = dict(max_iter=13, lr=0.5, min_error=0.0, check_every=1)
    exp = explain(model, images, "layer4", mode="specific", targets=[a, b], **kw)
    refs = solve_all(model, images, "layer4", [[a, b]] * 2, "specific", **kw)
    assert all(r["iterations"] == 13 for row in refs for r in row)
    assert (torch.as_tensor(exp.iterations) == 13).all()
    assert_parity(exp, refs, model, images, 13)


def test_default_check_every(get_model, gen):
    """Defaults lr=0.5, check_every=50: pick min_error so that image 0 stops at the check i=50."""
    model = get_model("resnet18")
    images = rand_images(gen, 2, (32, 32))
    full = oracle(model, images[:1], "layer3", mode="oblivious", max_iter=53, lr=0.5,
                  check_every=50, min_error=0.0)
    assert [i for i, _ in full["history"]] == [0, 50]
    m = 2.0 * min_check_delta(full["history"])
    exp = explain(model, images, "layer3", mode="oblivious", max_iter=53, min_error=m)
    refs = solve_all(model, images, "layer3", [[None]] * 2, "oblivious", max_iter=53, lr=0.5,
                     check_every=50, min_error=m)
    assert refs[0][0]["iterations"] == 51
    assert_parity(exp, refs, model, images, 53)


def test_stop_at_first_check(get_model, gen):
    """|loss_0 - 32767| < min_error: every problem stops after its first update."""
    model = get_model("resnet18")
    images = rand_images(gen, 2, SMALL_HW)
    kw = dict(max_iter=20, min_error=1e9, check_every=7)
    exp = explain(model, images, "layer3", mode="oblivious", **kw)
    refs = solve_all(model, images, "layer3", [[None]] * 2, "oblivious", **kw)
    assert all(r["iterations"] == 1 for row in refs for r in row)
    assert_parity(exp, refs, model, images, 20)


# ----------------------------------------------------------------------------------------------
# 3. constraints x optimizers x inits
# ----------------------------------------------------------------------------------------------

# init "ones" at the last block (a (3, 2) grid), "normal" inside the net (a (3, 4) grid): every
# constraint x optimizer meets both kinds of tail
OPT_WHERE = {"ones": ("layer4", (96, 64)), "normal": ("layer3", (48, 64))}
OPT_KW = dict(max_iter=14, check_every=4)      # checks at 0, 4, 8, 12
OPT_LR = {"sgd": 0.5, "adam": 0.05}


@pytest.mark.parametrize("init", ["ones", "normal"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("constraint", ["l2norm", "softmax", "gauss"])
def test_options_parity(get_model, gen, constraint, optimizer, init):
    model = get_model("resnet18")
    layer, hw = OPT_WHERE[init]
    images = rand_images(gen, 2, hw)
    mode = "specific" if (optimizer == "adam") == (init == "ones") else "oblivious"
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    kw = dict(OPT_KW, lr=OPT_LR[optimizer], optimizer=optimizer, constraint=constraint)
    if mode == "specific":
        targets_arg = rand_classes(gen, 1)
        targets = [targets_arg] * 2
    else:
        targets_arg, targets = None, [[None]] * 2
    inits = None
    if init == "normal":
        H, W = hw[0] // 16, hw[1] // 16
        inits = normal_init(seed, 2, 1, (2,) if constraint == "gauss" else (H, W))
    m, refs, _ = _calibrated(model, images, layer, targets, mode, inits=inits, **kw)
    exp = explain(model, images, layer, mode=mode, targets=targets_arg, init=init,
                          seed=seed if init == "normal" else None, min_error=m, **kw)
    assert_parity(exp, refs, model, images, OPT_KW["max_iter"], constraint=constraint)
    if constraint in ("softmax", "gauss"):
        sums = exp.maps.double().sum(dim=(-2, -1))
        torch.testing.assert_close(sums, torch.ones_like(sums))


def test_oracle_equals_literal_fast_loop(get_model, gen):
    """Self-check of the oracle: the official script's own loop (head-only "fast" mode, a fresh
    L2_CAF-style filter, SGD + LambdaLR, a check every `check` steps with prev = 32767) run
    literally on resnet18's layer4 gives the oracle's answer (the whole model with a hook)."""
    model = get_model("resnet18")
    image = rand_images(gen, 1, (64, 80))
    max_iter, lr0, check = 14, 0.5, 4
    store = []
    h = model.layer4.register_forward_hook(lambda m, i, o: store.append(o.detach()))
    with torch.no_grad():
        NT = model(image)
    h.remove()
    A = store[-1]
    post_conv_subnet = torch.nn.Sequential(model.avgpool, torch.nn.Flatten(), model.fc)
    top_i = rand_classes(gen, 1)[0]
    min_error = {"oblivious": 1e-4, "specific": 1e-2}
    for mode in ("oblivious", "specific"):
        filt = torch.nn.Parameter(torch.ones(A.shape[-2:], dtype=torch.float64))
        if mode == "oblivious":
            loss_fn = torch.nn.MSELoss()
            crit = lambda FT: loss_fn(FT, NT)  # noqa: E731
        else:
            ph = torch.ones_like(NT)
            ph[0, top_i] = -1
            crit = lambda FT: torch.sum(FT * ph)  # noqa: E731
        optimizer = torch.optim.SGD([filt], lr=lr0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda=lambda step: ref_poly(step, lr0, max_iter) / lr0)
        prev_loss = torch.tensor(32767)
        iteration = 0
        while iteration < max_iter:
            FT = post_conv_subnet(A * F.normalize(filt, dim=[0, 1]))
            loss = crit(FT)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            sched.step()
            if iteration % check == 0:
                if torch.abs(loss.item() - prev_loss) < min_error[mode]:
                    break
                prev_loss = loss
            iteration += 1
        r = oracle(model, image, "layer4", top_i if mode == "specific" else None, mode=mode,
                   max_iter=max_iter, lr=lr0, min_error=min_error[mode], check_every=check)
        literal_iterations = min(iteration + 1, max_iter)
        assert r["iterations"] == literal_iterations
        f = filt.detach().abs()
        torch.testing.assert_close(r["map"], f / torch.linalg.norm(f), rtol=1e-9, atol=1e-12)
        hist = [loss for _, loss in r["history"]]
        assert hist[-1] < hist[0]          # SGD lowers the loss


def test_gauss_grid_orientation():
    """The oracle's gaussian: x along columns, y along rows, centred grid, sum 1."""
    mu = torch.tensor([0.7, -0.4], dtype=torch.float64)
    g = gaussian_multiplier(mu, 4, 6)
    x = [j - 2.5 for j in range(6)]
    y = [i - 1.5 for i in range(4)]
    expect = torch.tensor([[math.exp(-((xj - 0.7) ** 2 + (yi + 0.4) ** 2) / 2) for xj in x]
                           for yi in y], dtype=torch.float64)
    torch.testing.assert_close(g, expect / expect.sum())
    assert g.argmax().item() == 1 * 6 + 3  # row y=-0.5 -> i=1, column x=0.5 -> j=3 (closest)


# ----------------------------------------------------------------------------------------------
# 4. user objective, targets=None, layer given as a module
# ----------------------------------------------------------------------------------------------

def l1_objective(FT, NT):
    return (FT - NT).abs().mean(dim=-1)


def test_user_objective(get_model, gen):
    model = get_model("resnet18")
    images = rand_images(gen, 2, (64, 80))
    kw = dict(max_iter=10, lr=0.5, min_error=1e-4, check_every=3)
    exp = explain(model, images, "layer4", objective=l1_objective, **kw)
    refs = solve_all(model, images, "layer4", [[None]] * 2, "oblivious",
                     objective=l1_objective, **kw)
    assert_parity(exp, refs, model, images, 10, check_targets=False)
    # and it is not the MSE problem
    mse = solve_all(model, images[:1], "layer4", [[None]], "oblivious", **kw)
    assert (mse[0][0]["map"] - refs[0][0]["map"]).abs().max() > 1e-4


def test_targets_none_is_top1(get_model, gen):
    model = get_model("googlenet")
    images = rand_images(gen, 3, (64, 64))
    kw = dict(max_iter=6, lr=0.5, min_error=1e-6, check_every=2)
    exp = explain(model, images, "inception5b", mode="specific", targets=None, **kw)
    with torch.no_grad():
        top1 = model(images).argmax(dim=1)
    assert tuple(exp.targets.shape) == (3, 1)
    assert torch.equal(torch.as_tensor(exp.targets)[:, 0].long(), top1)
    refs = solve_all(model, images, "inception5b", [[int(c)] for c in top1], "specific", **kw)
    assert_parity(exp, refs, model, images, 6)


def test_layer_as_module(get_model, gen):
    model = get_model("resnet18")
    images = rand_images(gen, 2, SMALL_HW)
    module = model.layer3[1].conv1
    kw = dict(max_iter=8, lr=0.5, min_error=1e-6, check_every=4)
    cls = rand_classes(gen, 1)
    exp = explain(model, images, module, mode="specific", targets=cls, **kw)
    refs = solve_all(model, images, "layer3.1.conv1", [cls] * 2, "specific", **kw)
    assert_parity(exp, refs, model, images, 8)


# ----------------------------------------------------------------------------------------------
# 5. upsample
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(37, 53), (64, 64)])
def test_upsample(get_model, gen, size):
    model = get_model("resnet18")
    images = rand_images(gen, 2, (96, 80))
    exp = explain(model, images, "layer3", mode="specific",
                          targets=rand_classes(gen, 2), max_iter=6, check_every=3, min_error=0.0)
    up = exp.upsample(size)
    N, T, H, W = exp.maps.shape
    assert tuple(up.shape) == (N, T, *size)
    flat = up.reshape(N * T, -1).double()
    torch.testing.assert_close(flat.min(dim=1).values, torch.zeros(N * T, dtype=torch.float64))
    torch.testing.assert_close(flat.max(dim=1).values, torch.ones(N * T, dtype=torch.float64))
    ref = F.interpolate(exp.maps.double().reshape(N * T, 1, H, W), size=size, mode="bilinear",
                        align_corners=False).reshape(N * T, -1)
    lo = ref.min(dim=1, keepdim=True).values
    hi = ref.max(dim=1, keepdim=True).values
    ref = ((ref - lo) / (hi - lo)).reshape(N, T, *size)
    torch.testing.assert_close(up.double(), ref, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# 6. the reference API
# ----------------------------------------------------------------------------------------------

def test_normalize_filter_numpy():
    rng = np.random.default_rng(7)
    f = rng.standard_normal((7, 7))
    out = np.asarray(caffast.normalize_filter(f))
    expect = np.abs(f) / np.linalg.norm(np.abs(f))
    assert out.shape == (7, 7)
    np.testing.assert_allclose(out, expect, rtol=1e-6, atol=1e-12)
    out2 = np.asarray(caffast.normalize_filter(f.astype(np.float32), filter_type="l2norm"))
    np.testing.assert_allclose(out2, expect, rtol=1e-5, atol=1e-7)


def test_normalize_filter_torch(gen):
    f = torch.randn((5, 6), generator=gen, dtype=torch.float64)
    out = caffast.normalize_filter(f)
    out = torch.as_tensor(np.asarray(out.detach() if torch.is_tensor(out) else out))
    expect = f.abs() / torch.linalg.norm(f.abs())
    assert tuple(out.shape) == (5, 6)
    torch.testing.assert_close(out.double(), expect, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("lr0,max_iter,min_lr", [(0.5, 1000, None), (0.1, 40, 1e-3)])
def test_polynomial_lr_decay(lr0, max_iter, min_lr):
    for step in [0, 1, 7, max_iter // 2, max_iter - 1, max_iter]:
        if min_lr is None:
            got = caffast.polynomial_lr_decay(step, lr0, max_iter)
            m = 1e-5
        else:
            got = caffast.polynomial_lr_decay(step, lr0, max_iter, min_learning_rate=min_lr)
            m = min_lr
        expect = (lr0 - m) * (1 - step / max_iter) + m
        assert abs(float(got) - expect) <= 1e-12 * max(1.0, abs(expect)), (step, got, expect)
        assert abs(ref_poly(step, lr0, max_iter, m) - expect) <= 1e-15


@pytest.mark.parametrize("spatial", [7, (3, 5)])
def test_l2_caf_module(gen, spatial):
    H, W = (spatial, spatial) if isinstance(spatial, int) else spatial
    caf = caffast.L2_CAF(spatial)
    assert isinstance(caf, torch.nn.Module)
    params = dict(caf.named_parameters())
    assert list(params) == ["filter"]
    filt = caf.filter
    assert tuple(filt.shape) == (H, W) and filt.requires_grad
    assert torch.equal(filt.detach(), torch.ones_like(filt))
    A = torch.randn((2, 4, H, W), generator=gen, dtype=filt.dtype)
    torch.testing.assert_close(caf(A), A * F.normalize(filt.detach(), dim=[0, 1]))
    with torch.no_grad():
        filt.copy_(torch.randn((H, W), generator=gen, dtype=filt.dtype))
    out = caf(A)
    torch.testing.assert_close(out, A * F.normalize(filt.detach(), dim=[0, 1]))
    out.sum().backward()
    assert filt.grad is not None and filt.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["resnet50", "googlenet", "densenet169"])
def test_load_architecture(arch):
    torch.manual_seed(0)
    model, feature_maps, head = caffast.load_architecture(arch, weights=None)
    assert isinstance(model, torch.nn.Module) and isinstance(head, torch.nn.Module)
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    img = torch.randn((2, 3, 64, 64), generator=torch.Generator().manual_seed(1),
                      dtype=next(model.parameters()).dtype)
    before = len(feature_maps)
    with torch.no_grad():
        out = model(img)
    assert len(feature_maps) == before + 1
    A = feature_maps[-1]
    assert not A.requires_grad and A.dim() == 4 and A.shape[0] == 2
    expect_module = {"resnet50": "layer4", "googlenet": "inception5b",
                     "densenet169": "features"}[arch]
    store = []
    h = model.get_submodule(expect_module).register_forward_hook(
        lambda m, i, o: store.append(o.detach()))
    try:
        with torch.no_grad():
            model(img)
    finally:
        h.remove()
    torch.testing.assert_close(A, store[0], rtol=1e-6, atol=1e-6)   # the last conv block
    with torch.no_grad():
        head_out = head(A)
    torch.testing.assert_close(head_out, out, rtol=1e-5, atol=1e-5)
    # and the head is the reference's head
    with torch.no_grad():
        if arch == "densenet169":
            ref = model.classifier(torch.flatten(F.adaptive_avg_pool2d(F.relu(A), 1), 1))
        else:
            ref = model.fc(torch.flatten(model.avgpool(A), 1))
    torch.testing.assert_close(head_out, ref, rtol=1e-5, atol=1e-5)
