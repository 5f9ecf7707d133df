"""One tail evaluation (forward and backward to the filter) with and without the folded prefix,
side by side in one run, on the breakpoints of benchmarks/test_breakpoints.py.

    pytest benchmarks/test_folds.py --benchmark-group-by=group --benchmark-json=folds.json

Groups are "<model>-<layer>-P<problems>-evaluation"; "fold once" is the one-time cost per call.
"""

import pytest
import torch

from caffast.core.breakpoints import split
from caffast.core.folds import fold_tail
from test_breakpoints import BREAKPOINTS, build_model

ROUNDS = dict(rounds=5, iterations=1, warmup_rounds=2)


@pytest.fixture(scope="module")
def tails():
    cache = {}

    def get(case):
        if case not in cache:
            arch, layer = BREAKPOINTS[case]
            model = build_model(arch, torch.device("cpu"))
            images = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                capture, tail = split(model, layer, images)
            cache[case] = capture.features, tail
        return cache[case]

    return get


def evaluation(call, features, problems):
    index = torch.arange(problems) % features.shape[0]
    g = torch.randn(problems, *features.shape[2:], generator=torch.Generator().manual_seed(2))

    def run():
        params = g.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(call(params, index).square().mean(), params)
        return grad

    return run


@pytest.mark.parametrize("problems", [1, 8])
@pytest.mark.parametrize("case", BREAKPOINTS)
def test_plain_tail(benchmark, tails, case, problems):
    features, tail = tails(case)
    benchmark.group, benchmark.name = f"{case}-P{problems}-evaluation", "plain tail"
    benchmark.pedantic(evaluation(lambda g, i: tail(features.index_select(0, i) * g[:, None], i), features, problems),
                       **ROUNDS)  # fmt: skip


@pytest.mark.parametrize("problems", [1, 8])
@pytest.mark.parametrize("case", BREAKPOINTS)
def test_folded_tail(benchmark, tails, case, problems):
    features, tail = tails(case)
    folded = fold_tail(tail.graph_module, features, tail.captured)
    benchmark.group, benchmark.name = f"{case}-P{problems}-evaluation", "folded tail"
    benchmark.extra_info["ops folded"] = len(folded.folded)
    benchmark.pedantic(evaluation(folded, features, problems), **ROUNDS)


@pytest.mark.parametrize("case", BREAKPOINTS)
def test_fold_once(benchmark, tails, case):
    features, tail = tails(case)
    benchmark.group, benchmark.name = f"{case}-fold", "fold once (8 images)"
    benchmark.pedantic(fold_tail, args=(tail.graph_module, features, tail.captured), rounds=2, iterations=1)
