"""The fold pass: walk a tail graph and fold every op that is affine in the filter.

The tail after a breakpoint runs on the filtered map X = A * g (A the features (N, C, H, W), g the
multiplier (P, H, W) of P problems, each on image image_index[p]).  The ops right after the breakpoint
are often affine in X, hence in g: 1 x 1 and k x k convolutions, eval BatchNorm, global average
pooling, flatten, Linear, additions of captured values, concatenation ...  Those ops are applied to the
feature map once, here, by their rules (caffast.core.folds.rules), and every evaluation starts after
them.

Folding walks the graph in order and stops, per node, at the first op that is not affine in g (ReLU,
LayerNorm, max-pool, the product of two g-dependent values, a shape query, ...) or that does not pay
(its folded value would cost more per evaluation than running it, or exceed the memory budget per
image).  The remaining ops form a new fx graph that runs on the folded values at the frontier
(caffast.core.folds.tail).
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from ..breakpoints import FxTail, Tail, hooks_of
from .affine import Rep, Spatial, Static, Unfoldable, identity_key
from .rules import FoldContext, Folding, is_folded, normalized_arguments, rule_of
from .tail import FoldedTail, FoldStep, Materializer

DEFAULT_BUDGET = 1 << 24  # elements stored per image for one folded value (64 MiB in float32)


def _op_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    if node.op == "call_method":
        return f".{node.target}()"
    return getattr(node.target, "__name__", str(node.target))


_INPLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv)


def _is_inplace(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether a node mutates its first argument."""
    if node.op == "call_module":
        module = modules.get(node.target)
        if isinstance(module, (nn.Dropout, nn.Dropout2d)) and not module.training:
            return False  # identity in eval
        return bool(getattr(module, "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op == "call_function":
        if node.target in _INPLACE_OPERATORS or node.kwargs.get("inplace", False):
            return True
        return getattr(node.target, "__name__", "").endswith("_")
    return False


class _Folder:
    """One fold of one tail for one batch of images: the folded value of every node folded so far."""

    def __init__(self, graph_module: fx.GraphModule, features: torch.Tensor, captured: list[torch.Tensor], budget: int):
        self.gm = graph_module
        self.modules = dict(graph_module.named_modules())
        self.features = features.detach()
        self.captured = [c.detach() for c in captured]
        n_images = features.shape[0]
        self.grid = tuple(features.shape[2:])
        self.context = FoldContext(self.features, n_images, self.grid, budget)
        self.placeholders = [n for n in graph_module.graph.nodes if n.op == "placeholder"]
        self.feature = self.placeholders[0]
        self.reps: dict[fx.Node, Rep] = {}
        self.statics: dict[fx.Node, Static] = {}
        self.order = {node: i for i, node in enumerate(graph_module.graph.nodes)}
        self.depends = {self.feature}
        for node in graph_module.graph.nodes:
            if any(a in self.depends for a in node.all_input_nodes):
                self.depends.add(node)

    def static(self, node: fx.Node) -> Static:
        """The value of a node that does not depend on the filter, computed once."""
        if node in self.statics:
            return self.statics[node]
        if node.op == "placeholder":
            index = self.placeholders.index(node) - 1
            result = Static(self.captured[index].clone(), True)
        elif node.op == "get_attr":
            value = self.gm
            for part in node.target.split("."):
                value = getattr(value, part)
            result = Static(value.detach() if isinstance(value, torch.Tensor) else value, False)
        else:
            batched = False

            def load(n: fx.Node):
                nonlocal batched
                s = self.static(n)
                batched = batched or s.batched
                return s.value

            args = fx.node.map_arg(node.args, load)
            kwargs = fx.node.map_arg(node.kwargs, load)
            with torch.no_grad():
                if node.op == "call_function":
                    value = node.target(*args, **kwargs)
                elif node.op == "call_method":
                    value = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:
                    value = self.modules[node.target](*args, **kwargs)
            result = Static(value, batched)
        self.statics[node] = result
        return result

    def operand(self, node: fx.Node) -> Any:
        """An input node as its folded value or its Static value; raises Unfoldable for unfolded ones."""
        if node in self.reps:
            return self.reps[node]
        if node in self.depends:
            raise Unfoldable(f"input {node.name} is not folded")
        return self.static(node)

    def fold(self, node: fx.Node) -> tuple[Rep, str, str]:
        """The folded value of a node: (rep, op name, detail), or raises Unfoldable."""
        for arg in node.all_input_nodes:
            if arg in self.depends and arg not in self.reps:
                raise Unfoldable(f"input {arg.name} is not folded")
            if arg in self.reps:
                for user in arg.users:
                    if user is not node and self.order[user] < self.order[node] and _is_inplace(user, self.modules):
                        raise Unfoldable(f"{arg.name} was modified in place by {user.name}")
        inputs = [self.reps[a] for a in node.all_input_nodes if a in self.reps]
        before = sum(r.cost() for r in inputs)
        rep, op, work = self._apply_rule(node)
        cost = rep.cost()
        if cost > self.context.budget:
            raise Unfoldable(f"{rep.describe()} exceeds the budget")
        if cost > before + work:
            raise Unfoldable(f"does not pay ({cost} > {before} + {work} per problem)")
        return rep, op, rep.describe()

    def _apply_rule(self, node: fx.Node) -> Folding:
        module = self.modules[node.target] if node.op == "call_module" else None
        if module is not None and hooks_of(module):  # folded, the module would never be called, nor its hooks
            raise Unfoldable(f"{type(module).__name__} has hooks")
        name = _op_name(node, self.modules)
        rule = rule_of(node, module)
        if rule is None:
            raise Unfoldable(f"{name} is not folded" if node.op == "call_method" else f"{name} is not affine")
        arguments = normalized_arguments(node, self.gm, rule)
        if arguments is None:
            raise Unfoldable(f"{name} call form")
        arguments = fx.node.map_arg(arguments, self.operand)
        if module is not None and not is_folded(arguments.get("input")):
            raise Unfoldable(f"{name} call form")
        return rule.fold(self.context, module, arguments)

    def run(self) -> FoldedTail:
        graph = self.gm.graph
        steps: list[FoldStep] = []
        self.reps[self.feature] = Spatial(self.features[:, None], [identity_key(len(self.grid))], None)
        for node in graph.nodes:
            if node.op in ("placeholder", "output") or node not in self.depends:
                continue
            try:
                with torch.no_grad():
                    rep, op, detail = self.fold(node)
                self.reps[node] = rep
                steps.append(FoldStep(node.name, op, True, detail))
            except Unfoldable as reason:
                if all(a in self.reps or a not in self.depends for a in node.all_input_nodes):
                    steps.append(FoldStep(node.name, _op_name(node, self.modules), False, str(reason)))
        return self._build(steps)

    def _build(self, steps: list[FoldStep]) -> FoldedTail:
        graph = self.gm.graph
        folded = set(self.reps)
        frontier = [n for n in graph.nodes if n in folded and any(u not in folded for u in n.users)]
        rest = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for node in frontier:
            env[node] = rest.placeholder(f"folded_{node.name}")
        captured_nodes = self.placeholders[1:]
        for node in captured_nodes:
            env[node] = rest.placeholder(node.name)
        for node in graph.nodes:
            if node.op == "placeholder" or node in folded:
                continue
            if node.op == "output":
                rest.output(fx.node.map_arg(node.args[0], lambda n: env[n]))
            else:
                env[node] = rest.node_copy(node, lambda n: env[n])
        rest_module = fx.GraphModule(self.gm, rest)
        rest_module.graph.eliminate_dead_code()
        used = [i for i, node in enumerate(captured_nodes) if env[node].users]
        for i, node in enumerate(captured_nodes):
            if i not in used:
                rest_module.graph.erase_node(env[node])
        rest_module.recompile()
        materializers = [(n.name, Materializer(self.reps[n], self.grid)) for n in frontier]
        captured = [self.captured[i] for i in used]
        return FoldedTail(materializers, rest_module, captured, self.grid, self.features.dtype, steps)


def fold_tail(
    tail_graph_module: fx.GraphModule,
    features: torch.Tensor,
    captured: list[torch.Tensor],
    budget: int = DEFAULT_BUDGET,
) -> FoldedTail:
    """Fold the affine prefix of `tail(feature, *captured) -> output` for the images of `features`.

    `features` (N, C, H, W) (or (N, C, D, H, W)) and `captured` (each (N, ...)) are the per-image
    values the tail reads; `budget` bounds the elements stored per image for any folded value.  The
    result is called as folded(g, image_index) with g (P, *grid) the multiplier of P problems and returns what
    tail(features[image_index] * g[:, None], *captured[image_index]) returns, differentiable in g.
    """
    return _Folder(tail_graph_module, features, captured, budget).run()


def fold_prefix(tail: Tail, features: torch.Tensor) -> Optional[FoldedTail]:
    """The folded form of an extracted tail, or None where nothing folds (or the tail is the hook
    tail, which reruns the whole model)."""
    if not isinstance(tail, FxTail):
        return None
    folded = fold_tail(tail.graph_module, features, tail.captured)
    return folded if folded.folded else None
