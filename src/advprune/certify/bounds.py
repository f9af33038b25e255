"""Sound output bounds over an L∞ ball: IBP, CROWN and CROWN-IBP, implemented natively.

Methods (``method=``):

* ``"ibp"`` -- interval bound propagation (Gowal et al., "On the Effectiveness of Interval
  Bound Propagation for Training Verifiably Robust Models", 2018): every layer maps a box to
  a box; the last linear layer is merged with the specification matrix ``C`` ("elision").
* ``"crown"`` -- CROWN (Zhang et al., "Efficient Neural Network Robustness Certification with
  General Activation Functions", NeurIPS 2018): linear relaxations of every ReLU / max-pool,
  back-substituted to the input; the pre-activation bounds of every unstable ReLU are
  themselves computed by CROWN (and intersected with IBP's, so they are never looser).
  Cost grows with the number of neurons: it is refused (one-line ``ConfigError``) for models
  with more than ``max_crown_neurons`` ReLU / max-pool neurons per input.
* ``"crown-ibp"`` -- CROWN-IBP (Zhang et al., "Towards Stable and Efficient Training of
  Verifiably Robust Neural Networks", ICLR 2020): IBP for the intermediate bounds, one CROWN
  back-substitution from the output.

ReLU relaxation: upper line through ``(l, 0)`` and ``(u, u)``; lower slope 1 if ``u > -l``
else 0 (the adaptive choice of CROWN). Max-pool relaxation (DeepPoly, Singh et al. 2019):
``max_i z_i >= z_j*`` with ``j*`` the window element with the largest lower bound, and
``max_i z_i <= max_i u_i`` (``= z_j*`` exactly when ``l_j* >= u_i`` for every other ``i``).

Why native: auto_LiRPA (0.3, the only release on the package index) requires ``torch<1.13``
and ``torchvision`` and cannot be installed beside torch 2.13, so these bounds are written
here in plain PyTorch; they are differentiable, so the same code trains (``ibp``,
``crown-ibp``, ``mixtrain``) and verifies.

Traversal: the model is traced once with :mod:`torch.fx` (leaf modules: the model's
``Normalize``, Conv2d, Linear, BatchNorm, ReLU, pooling, Flatten, Identity, Dropout) into a
graph of supported operations; anything else is a one-line ``ConfigError`` naming the
operation, raised when :class:`BoundedModel` is built, before any work. Supported operations:
the ``normalize`` layer (per-channel affine), Conv2d (zero padding, any stride / dilation /
groups), Linear, BatchNorm1d/2d (eval mode: running statistics; train mode: the batch
statistics of the clean forward pass, as auto_LiRPA does), ReLU (module, ``F.relu``,
``Tensor.relu``), MaxPool2d (``ceil_mode=False``), AvgPool2d, AdaptiveAvgPool2d (module or
function), flatten / view / reshape keeping the batch dimension (sizes from ``x.size()`` /
``x.shape`` allowed), residual ``+`` of two tensors, Identity and Dropout (only in eval mode
or with ``p=0``).

Architectures advprune ships: ``digits_cnn``, ``cnn7``, ``resnet18/34/50``, ``vgg16``,
``vgg16_bn`` (eval mode; its dropout is not supported in train mode), ``wrn28_4/10`` and their
``head="conv"`` / ``"conv-bn"`` and ``bn_affine=False`` variants all trace to supported
operations, so IBP and CROWN-IBP work on all of them (IBP bounds of deep, not certifiably
trained ResNets / WRNs are loose to the point of being vacuous). Full CROWN is refused for
models above ``max_crown_neurons`` (default 20,000) ReLU / max-pool neurons per input:
``digits_cnn`` and ``cnn7`` on 8x8 digits qualify; ``cnn7``, ResNets, VGG and WRN on 32x32
CIFAR images do not. Masked (pruned) layers work unchanged: the effective weight
``module.weight`` of the torch parametrisation is used, and gradients reach mask scores.

Only the L∞ norm is supported; the input box is intersected with ``[0, 1]``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from advprune._validation import check_eps
from advprune.errors import ConfigError, UnknownNameError
from advprune.models.layers import Normalize

__all__ = [
    "BOUND_METHODS",
    "DEFAULT_MAX_CROWN_NEURONS",
    "BoundResult",
    "BoundedModel",
    "check_bound_method",
    "margin_spec",
]

BOUND_METHODS: tuple[str, ...] = ("ibp", "crown-ibp", "crown")
DEFAULT_MAX_CROWN_NEURONS = 20_000
# elements of one back-substitution coefficient tensor before CROWN splits its rows in chunks
_CHUNK_ELEMENTS = 1 << 24

_LEAF_TYPES: tuple[type[nn.Module], ...] = (
    Normalize,
    nn.Conv2d,
    nn.Linear,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Flatten,
    nn.Identity,
    nn.Dropout,
)
_RELU_FUNCTIONS = (F.relu, torch.relu)
_ADD_FUNCTIONS = (operator.add, torch.add)
_RESHAPE_FUNCTIONS = (torch.flatten, torch.reshape)
_POOL_FUNCTIONS = (F.avg_pool2d, F.adaptive_avg_pool2d)


def check_bound_method(method: str) -> str:
    """Canonical bound method name (``ibp``, ``crown-ibp``, ``crown``) or UnknownNameError."""
    key = str(method).strip().lower().replace("_", "-")
    if key not in BOUND_METHODS:
        raise UnknownNameError("bound method", str(method), BOUND_METHODS)
    return key


def margin_spec(y: Tensor, num_classes: int) -> Tensor:
    """Specification matrix ``C`` (N, K, K) with rows ``e_y - e_j``: ``C @ logits`` are the
    margins ``z_y - z_j`` (row ``y`` is zero). A sample is verified when the lower bound of
    every margin ``j != y`` is > 0; ``-lower`` are the worst-case logits of IBP training."""
    eye = torch.eye(num_classes, device=y.device)
    return eye[y].unsqueeze(1) - eye.unsqueeze(0)


@dataclass
class BoundResult:
    """Bounds of ``C @ logits`` (or of the logits without ``C``) over the input box.

    ``lower``/``upper``: the bounds of the requested method (``upper`` is None when not asked
    for); ``ibp_lower``/``ibp_upper``: IBP's bounds (computed in every method); ``clean``: the
    logits of the clean inputs (all of ``x``, also with ``subset``).
    """

    clean: Tensor
    lower: Tensor
    upper: Tensor | None
    ibp_lower: Tensor
    ibp_upper: Tensor


@dataclass
class _Op:
    index: int
    kind: str
    label: str
    inputs: tuple[int, ...] = ()
    node: fx.Node | None = None
    module: str | None = None
    fn: Callable[[Tensor], Tensor] | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Record:
    """What the clean forward pass learned: shapes and the per-call layer affine maps."""

    shapes: dict[int, tuple[int, ...]]
    weights: dict[int, tuple[Tensor, Tensor | None]]
    clean: Tensor


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, _LEAF_TYPES):
            return True
        return super().is_leaf_module(m, module_qualified_name)


_MAXPOOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _model_name(model: nn.Module) -> str:
    spec = getattr(model, "spec", None)
    return getattr(spec, "name", None) or type(model).__name__


class BoundedModel:
    """A model prepared for bound propagation (traced and checked once).

    Args:
        model: the classifier (inputs in [0, 1], logits out); masked layers are fine.
        input_shape: ``(spec, H, W)`` of one input; when given, shape-dependent checks (full
            CROWN's neuron limit) run now, otherwise on the first call.
        max_crown_neurons: the most ReLU / max-pool neurons per input full CROWN accepts.

    Raises:
        ConfigError: the model uses an operation the bounds do not support (one line naming
            it), or cannot be traced.
    """

    def __init__(
        self,
        model: nn.Module,
        input_shape: Sequence[int] | None = None,
        *,
        max_crown_neurons: int = DEFAULT_MAX_CROWN_NEURONS,
    ) -> None:
        self.model = model
        self.name = _model_name(model)
        self.max_crown_neurons = int(max_crown_neurons)
        self._meta_nodes: set[fx.Node] = set()  # size() / .shape[i] feeding reshapes
        self.ops = self._compile(model)
        self.output = self.ops[-1].inputs[0]
        self._relaxed = sorted({op.inputs[0] for op in self.ops if op.kind in ("relu", "maxpool")})
        self._neurons: int | None = None
        if input_shape is not None:
            self.check_input_shape(tuple(int(s) for s in input_shape))

    # ------------------------------------------------------------------ tracing
    def _unsupported(self, what: str) -> ConfigError:
        return ConfigError(
            f"model {self.name!r} uses {what}, which IBP/CROWN bounds do not support "
            "(supported: normalize, Conv2d, Linear, BatchNorm, ReLU, max/avg pooling, flatten, "
            "residual +)"
        )

    def _compile(self, model: nn.Module) -> list[_Op]:
        try:
            graph = _Tracer().trace(model)
        except Exception as exc:  # fx raises many types on dynamic control flow
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(
                f"cannot trace model {self.name!r} for bound propagation ({first})"
            ) from None
        ops: list[_Op] = []
        where: dict[fx.Node, int] = {}
        inputs = 0
        for node in graph.nodes:
            op = self._compile_node(model, node, where)
            if op is None:
                continue
            if op.kind == "input":
                inputs += 1
            op.index = len(ops)
            where[node] = op.index
            ops.append(op)
        if inputs != 1:
            raise ConfigError(f"model {self.name!r} must take exactly one input tensor")
        if ops[-1].kind != "output":
            raise self._unsupported("a graph without a single output")
        return ops

    def _tensor_args(self, node: fx.Node, where: dict[fx.Node, int]) -> tuple[int, ...]:
        found: list[int] = []
        for a in list(node.args) + list(node.kwargs.values()):
            if isinstance(a, fx.Node):
                if a in self._meta_nodes:
                    continue
                if a not in where:
                    raise self._unsupported(f"an input of {node.name} computed outside the graph")
                found.append(where[a])
            elif isinstance(a, (list, tuple)) and any(
                isinstance(b, fx.Node) and b not in self._meta_nodes for b in a
            ):
                raise self._unsupported(f"a list of tensors in {node.name}")
        return tuple(found)

    def _compile_node(
        self, model: nn.Module, node: fx.Node, where: dict[fx.Node, int]
    ) -> _Op | None:
        label = node.name
        if node.op == "placeholder":
            return _Op(0, "input", label, node=node)
        if node.op == "output":
            arg = node.args[0]
            if not isinstance(arg, fx.Node):
                raise self._unsupported("an output that is not one tensor")
            return _Op(0, "output", label, (where[arg],), node=node)
        if node.op == "get_attr":
            raise self._unsupported(f"a tensor attribute ({node.target}) inside forward")
        if self._is_meta(node):  # x.size(0), x.shape[0]: shape arithmetic for reshapes
            self._meta_nodes.add(node)
            return None
        args = self._tensor_args(node, where)
        if node.op == "call_module":
            assert isinstance(node.target, str)
            return self._compile_module(model, node, args)
        target = node.target
        if node.op == "call_function":
            if target in _RELU_FUNCTIONS:
                return _Op(0, "relu", label, args[:1], node=node)
            if target in _ADD_FUNCTIONS:
                if len(args) != 2 or "alpha" in node.kwargs:
                    raise self._unsupported(f"an addition with a constant ({label})")
                return _Op(0, "add", label, args, node=node)
            if target in _RESHAPE_FUNCTIONS:
                return _Op(0, "reshape", label, args, node=node)
            if target in _POOL_FUNCTIONS:
                return _Op(0, "linear_fn", label, args, node=node, fn=self._partial(node))
            if target is F.max_pool2d:
                params = dict(zip(_MAXPOOL_ARGS, node.args[1:]))
                params.update(node.kwargs)
                return self._maxpool_op(label, args, node, params)
            name = getattr(target, "__name__", str(target))
            raise self._unsupported(f"the function {name} ({label})")
        if node.op == "call_method":
            if target == "relu":
                return _Op(0, "relu", label, args, node=node)
            if target in ("view", "reshape", "flatten"):
                return _Op(0, "reshape", label, args, node=node)
            if target == "add":
                if len(args) != 2:
                    raise self._unsupported(f"an addition with a constant ({label})")
                return _Op(0, "add", label, args, node=node)
            raise self._unsupported(f"the tensor method .{target}() ({label})")
        raise self._unsupported(f"the graph node {node.op} {target}")

    def _is_meta(self, node: fx.Node) -> bool:
        if node.op == "call_method" and node.target in ("size", "dim"):
            return True
        if node.op == "call_function" and node.target is getattr:
            return node.args[1] in ("shape", "ndim")
        if node.op == "call_function" and node.target is operator.getitem:
            return isinstance(node.args[0], fx.Node) and node.args[0] in self._meta_nodes
        return False

    @staticmethod
    def _partial(node: fx.Node) -> Callable[[Tensor], Tensor]:
        fn, rest, kwargs = node.target, node.args[1:], dict(node.kwargs)
        assert callable(fn)
        return lambda t: fn(t, *rest, **kwargs)

    def _maxpool_op(
        self, label: str, args: tuple[int, ...], node: fx.Node, p: dict[str, Any]
    ) -> _Op:
        if p.get("ceil_mode") or p.get("return_indices"):
            raise self._unsupported(f"max pooling with ceil_mode or return_indices ({label})")
        kernel = _pair(p["kernel_size"])
        stride = p.get("stride")
        stride = kernel if stride is None or stride == [] or stride == () else _pair(stride)
        params = {
            "kernel": kernel,
            "stride": stride,
            "padding": _pair(p.get("padding", 0)),
            "dilation": _pair(p.get("dilation", 1)),
        }
        return _Op(0, "maxpool", label, args[:1], node=node, params=params)

    def _compile_module(self, model: nn.Module, node: fx.Node, args: tuple[int, ...]) -> _Op:
        path = str(node.target)
        m = model.get_submodule(path)
        label = path
        if len(args) != 1:
            raise self._unsupported(f"a module called with {len(args)} tensors ({path})")
        if isinstance(m, Normalize):
            return _Op(0, "normalize", label, args, node=node, module=path)
        if isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise self._unsupported(f"a Conv2d with {m.padding_mode!r}/string padding ({path})")
            return _Op(0, "conv", label, args, node=node, module=path)
        if isinstance(m, nn.Linear):
            return _Op(0, "linear", label, args, node=node, module=path)
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return _Op(0, "bn", label, args, node=node, module=path)
        if isinstance(m, nn.ReLU):
            return _Op(0, "relu", label, args, node=node, module=path)
        if isinstance(m, nn.MaxPool2d):
            p = {k: getattr(m, k) for k in _MAXPOOL_ARGS}
            op = self._maxpool_op(label, args, node, p)
            op.module = path
            return op
        if isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            if isinstance(m, nn.AvgPool2d) and (m.ceil_mode or m.divisor_override):
                raise self._unsupported(f"avg pooling with ceil_mode / divisor_override ({path})")
            return _Op(0, "linear_fn", label, args, node=node, module=path, fn=m)
        if isinstance(m, nn.Flatten):
            if m.start_dim == 0:
                raise self._unsupported(f"a Flatten over the batch dimension ({path})")
            return _Op(0, "reshape", label, args, node=node, module=path)
        if isinstance(m, (nn.Identity, nn.Dropout)):
            return _Op(0, "identity", label, args, node=node, module=path)
        raise self._unsupported(f"the layer {type(m).__name__} ({path})")

    # ------------------------------------------------------------------ checks
    def relaxed_neurons(self, input_shape: tuple[int, ...]) -> int:
        """ReLU / max-pool input neurons per input (full CROWN refines each unstable one)."""
        if self._neurons is None:
            was = [(m, m.training) for m in self.model.modules()]
            self.model.eval()
            try:
                with torch.no_grad():
                    device = _device(self.model)
                    rec = self._clean_pass(torch.zeros((2, *input_shape), device=device))
            finally:
                for m, flag in was:
                    m.training = flag
            self._neurons = sum(
                math.prod(rec.shapes[i][1:]) for i in self._relaxed if self.ops[i].kind != "relu"
            )
        return self._neurons

    def check_input_shape(self, input_shape: tuple[int, ...]) -> None:
        """Run the model once on zeros of ``input_shape`` (shape and batch checks)."""
        self.relaxed_neurons(input_shape)

    def check_method(self, method: str, input_shape: Sequence[int] | None = None) -> str:
        """Canonical ``method``; raise ConfigError if it cannot run on this model."""
        method = check_bound_method(method)
        if method == "crown" and input_shape is not None:
            n = self.relaxed_neurons(tuple(int(s) for s in input_shape))
            if n > self.max_crown_neurons:
                raise ConfigError(
                    f"full CROWN on {self.name!r} would back-substitute from {n:,} ReLU/pooling "
                    f"neurons per input (limit {self.max_crown_neurons:,}); use crown-ibp or ibp"
                )
        return method

    # ------------------------------------------------------------------ clean pass
    def _module(self, op: _Op) -> nn.Module:
        assert op.module is not None
        return self.model.get_submodule(op.module)

    def _clean_pass(self, x: Tensor) -> _Record:
        env: dict[fx.Node, Any] = {}
        shapes: dict[int, tuple[int, ...]] = {}
        weights: dict[int, tuple[Tensor, Tensor | None]] = {}
        batch = x.shape[0]
        out: Tensor | None = None
        for node, op in self._walk():
            if op is None:  # shape arithmetic: evaluate for the reshapes that use it
                args = fx.node.map_arg(node.args, lambda n: env[n])
                if node.op == "call_method":
                    env[node] = getattr(args[0], str(node.target))(*args[1:])
                else:
                    assert callable(node.target)
                    env[node] = node.target(*args)
                continue
            if op.kind == "input":
                value = x
            elif op.kind == "output":
                out = env[node.args[0]]
                break
            elif op.module is not None:
                m = self._module(op)
                inp = env[node.args[0]]
                if op.kind == "bn":
                    weights[op.index] = _bn_affine(m, inp)
                elif op.kind in ("conv", "linear"):
                    if op.kind == "linear" and inp.dim() != 2:
                        raise self._unsupported(f"a Linear on a {inp.dim()}-d input ({op.label})")
                    # the effective (masked) weight, computed once per call
                    weights[op.index] = (m.weight, m.bias)
                    env[node] = self._affine_forward(op, inp, *weights[op.index])
                    shapes[op.index] = tuple(env[node].shape)
                    continue
                elif op.kind == "identity" and isinstance(m, nn.Dropout) and m.training and m.p:
                    raise ConfigError(
                        f"model {self.name!r}: dropout ({op.label}) in train mode is not "
                        "supported by bound propagation; train without dropout"
                    )
                value = m(inp)
            else:
                args = fx.node.map_arg(node.args, lambda n: env[n])
                kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
                if node.op == "call_method":
                    value = getattr(args[0], str(node.target))(*args[1:], **kwargs)
                else:
                    assert callable(node.target)
                    value = node.target(*args, **kwargs)
            if not isinstance(value, Tensor) or value.shape[:1] != (batch,):
                raise self._unsupported(f"an operation that mixes the batch dimension ({op.label})")
            env[node] = value
            shapes[op.index] = tuple(value.shape)
        assert out is not None
        return _Record(shapes, weights, out)

    def _walk(self):
        """(node, op) in graph order; op None for meta (size) nodes."""
        by_node = {op.node: op for op in self.ops}
        node = self.ops[0].node
        assert node is not None
        for n in node.graph.nodes:
            yield n, by_node.get(n)

    # ------------------------------------------------------------------ IBP
    def _ibp(
        self, rec: _Record, xl: Tensor, xu: Tensor, spec: Tensor | None
    ) -> tuple[dict[int, tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]:
        bounds: dict[int, tuple[Tensor, Tensor]] = {}
        n = xl.shape[0]
        final: tuple[Tensor, Tensor] | None = None
        for op in self.ops:
            if op.kind == "input":
                bounds[op.index] = (xl, xu)
                continue
            if op.kind == "output":
                final = self._ibp_output(rec, bounds, spec)
                break
            lo, hi = bounds[op.inputs[0]]
            k = op.kind
            if k == "identity":
                out = (lo, hi)
            elif k == "normalize":
                m = self._module(op)
                out = ((lo - m.mean) / m.std, (hi - m.mean) / m.std)
            elif k in ("conv", "linear", "bn"):
                c, r = (hi + lo) / 2, (hi - lo) / 2
                w, b = rec.weights[op.index]
                c2 = self._affine_forward(op, c, w, b)
                r2 = self._affine_forward(op, r, w.abs(), None)
                out = (c2 - r2, c2 + r2)
            elif k == "linear_fn":
                assert op.fn is not None
                out = (op.fn(lo), op.fn(hi))
            elif k == "reshape":
                shape = (n, *rec.shapes[op.index][1:])
                out = (lo.reshape(shape), hi.reshape(shape))
            elif k == "relu":
                out = (lo.clamp_min(0), hi.clamp_min(0))
            elif k == "maxpool":
                p = op.params
                out = tuple(
                    F.max_pool2d(t, p["kernel"], p["stride"], p["padding"], p["dilation"])
                    for t in (lo, hi)
                )
            elif k == "add":
                l2, u2 = bounds[op.inputs[1]]
                out = (lo + l2, hi + u2)
            else:  # pragma: no cover - compile rejects others
                raise self._unsupported(k)
            bounds[op.index] = out  # type: ignore[assignment]
        assert final is not None
        return bounds, final

    def _affine_forward(self, op: _Op, t: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """Conv / Linear / BatchNorm (as scale ``w`` and shift ``b``) applied to ``t``."""
        if op.kind == "conv":
            m = self._module(op)
            return F.conv2d(t, w, b, m.stride, m.padding, m.dilation, m.groups)
        if op.kind == "linear":
            return F.linear(t, w, b)
        shape = (1, -1) + (1,) * (t.dim() - 2)
        out = t * w.view(shape)
        return out if b is None else out + b.view(shape)

    def _ibp_output(
        self, rec: _Record, bounds: dict[int, tuple[Tensor, Tensor]], spec: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        last = self.ops[self.output]
        if spec is None:
            return bounds[last.index]
        if last.kind == "linear":  # elision of the last layer (Gowal et al.)
            lo, hi = bounds[last.inputs[0]]
            w, b = rec.weights[last.index]
            cw = torch.einsum("nsk,ki->nsi", spec, w)
            c, r = (hi + lo) / 2, (hi - lo) / 2
            mid = torch.einsum("nsi,ni->ns", cw, c)
            if b is not None:
                mid = mid + torch.einsum("nsk,k->ns", spec, b)
            rad = torch.einsum("nsi,ni->ns", cw.abs(), r)
            return mid - rad, mid + rad
        zl, zu = bounds[last.index]
        cp, cn = spec.clamp_min(0), spec.clamp_max(0)
        lo = torch.einsum("nsk,nk->ns", cp, zl) + torch.einsum("nsk,nk->ns", cn, zu)
        hi = torch.einsum("nsk,nk->ns", cp, zu) + torch.einsum("nsk,nk->ns", cn, zl)
        return lo, hi

    # ------------------------------------------------------------------ CROWN
    def _backward(
        self,
        rec: _Record,
        start: int,
        la: Tensor | None,
        ua: Tensor | None,
        bounds: dict[int, tuple[Tensor, Tensor]],
        xl: Tensor,
        xu: Tensor,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Back-substitute ``la``/``ua`` (N, S, *shape of op ``start``) to the input box."""
        ref = la if la is not None else ua
        assert ref is not None
        n, s = ref.shape[:2]
        coef: dict[int, list[Tensor | None]] = {start: [la, ua]}
        lbias = ref.new_zeros(n, s) if la is not None else None
        ubias = ref.new_zeros(n, s) if ua is not None else None
        for op in reversed(self.ops[: start + 1]):
            if op.index not in coef:
                continue
            la, ua = coef.pop(op.index)
            if op.kind == "input":
                c, r = ((xu + xl) / 2).flatten(1), ((xu - xl) / 2).flatten(1)
                if la is not None:
                    a = la.flatten(2)
                    lbias = (
                        lbias
                        + torch.einsum("nsi,ni->ns", a, c)
                        - torch.einsum("nsi,ni->ns", a.abs(), r)
                    )
                if ua is not None:
                    a = ua.flatten(2)
                    ubias = (
                        ubias
                        + torch.einsum("nsi,ni->ns", a, c)
                        + torch.einsum("nsi,ni->ns", a.abs(), r)
                    )
                continue
            outs, lb_add, ub_add = self._back_op(op, rec, la, ua, bounds)
            if lb_add is not None:
                lbias = lbias + lb_add
            if ub_add is not None:
                ubias = ubias + ub_add
            for idx, (a_l, a_u) in zip(op.inputs, outs):
                if idx in coef:
                    prev = coef[idx]
                    coef[idx] = [
                        None if p is None else p + q  # type: ignore[operator]
                        for p, q in zip(prev, (a_l, a_u))
                    ]
                else:
                    coef[idx] = [a_l, a_u]
        return lbias, ubias

    def _back_op(
        self,
        op: _Op,
        rec: _Record,
        la: Tensor | None,
        ua: Tensor | None,
        bounds: dict[int, tuple[Tensor, Tensor]],
    ) -> tuple[list[tuple[Tensor | None, Tensor | None]], Tensor | None, Tensor | None]:
        k = op.kind
        in_shape = rec.shapes[op.inputs[0]][1:]
        if k in ("identity", "output"):
            return [(la, ua)], None, None
        if k == "add":
            return [(la, ua), (la, ua)], None, None
        if k == "reshape":
            return [(_reshape_coef(la, in_shape), _reshape_coef(ua, in_shape))], None, None
        if k == "relu":
            lo, hi = bounds[op.inputs[0]]
            return self._back_relu(lo, hi, la, ua)
        if k == "maxpool":
            lo, hi = bounds[op.inputs[0]]
            return self._back_maxpool(op, lo, hi, la, ua)
        # affine operations: A_in = A @ W (the same map for lower and upper coefficients)
        same = la is ua

        def lin(a: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
            if a is None:
                return None, None
            return self._back_affine(op, rec, a, in_shape)

        l_in, l_b = lin(la)
        u_in, u_b = (l_in, l_b) if same else lin(ua)
        return [(l_in, u_in)], l_b, u_b

    def _back_affine(
        self, op: _Op, rec: _Record, a: Tensor, in_shape: tuple[int, ...]
    ) -> tuple[Tensor, Tensor | None]:
        n, s = a.shape[:2]
        k = op.kind
        if k == "normalize":
            m = self._module(op)
            std, mean = m.std.view(1, 1, -1, 1, 1), m.mean.view(1, 1, -1, 1, 1)
            return a / std, -(a * (mean / std)).flatten(2).sum(-1)
        if k == "linear":
            w, b = rec.weights[op.index]
            return a @ w, (a @ b if b is not None else None)
        if k == "conv":
            w, b = rec.weights[op.index]
            m = self._module(op)
            flat = a.reshape(n * s, *a.shape[2:])
            stride, pad, dil = _pair(m.stride), _pair(m.padding), _pair(m.dilation)
            extra = tuple(
                in_shape[1 + d]
                - ((flat.shape[2 + d] - 1) * stride[d] - 2 * pad[d] + dil[d] * (w.shape[2 + d] - 1)
                   + 1)
                for d in range(2)
            )  # fmt: skip
            back = F.conv_transpose2d(flat, w, None, stride, pad, extra, m.groups, dil)
            bias = a.sum((3, 4)) @ b if b is not None else None
            return back.view(n, s, *in_shape), bias
        if k == "bn":
            scale, shift = rec.weights[op.index]
            shape = (1, 1, -1) + (1,) * (a.dim() - 3)
            assert shift is not None
            return a * scale.view(shape), (a * shift.view(shape)).flatten(2).sum(-1)
        if k == "linear_fn":  # a parameter-free linear map (pooling): its adjoint by autograd
            assert op.fn is not None
            z = torch.zeros((n * s, *in_shape), dtype=a.dtype, device=a.device, requires_grad=True)
            with torch.enable_grad():
                out = op.fn(z)
                (back,) = torch.autograd.grad(
                    out, z, a.reshape(n * s, *a.shape[2:]), create_graph=a.requires_grad
                )
            return back.view(n, s, *in_shape), None
        raise self._unsupported(k)  # pragma: no cover

    @staticmethod
    def _back_relu(
        lo: Tensor, hi: Tensor, la: Tensor | None, ua: Tensor | None
    ) -> tuple[list[tuple[Tensor | None, Tensor | None]], Tensor | None, Tensor | None]:
        active = lo >= 0
        unstable = (lo < 0) & (hi > 0)
        width = torch.where(unstable, hi - lo, torch.ones_like(hi))
        up_slope = torch.where(active, 1.0, torch.where(unstable, hi / width, 0.0))
        up_bias = torch.where(unstable, -up_slope * lo, 0.0)
        lo_slope = torch.where(active, 1.0, torch.where(unstable & (hi > -lo), 1.0, 0.0))
        up_slope, up_bias, lo_slope = (t.unsqueeze(1) for t in (up_slope, up_bias, lo_slope))
        l_in = u_in = lb = ub = None
        if la is not None:
            pos, neg = la.clamp_min(0), la.clamp_max(0)
            l_in = pos * lo_slope + neg * up_slope
            lb = (neg * up_bias).flatten(2).sum(-1)
        if ua is not None:
            pos, neg = ua.clamp_min(0), ua.clamp_max(0)
            u_in = pos * up_slope + neg * lo_slope
            ub = (pos * up_bias).flatten(2).sum(-1)
        return [(l_in, u_in)], lb, ub

    @staticmethod
    def _back_maxpool(
        op: _Op, lo: Tensor, hi: Tensor, la: Tensor | None, ua: Tensor | None
    ) -> tuple[list[tuple[Tensor | None, Tensor | None]], Tensor | None, Tensor | None]:
        p = op.params
        kernel, stride, pad, dil = p["kernel"], p["stride"], p["padding"], p["dilation"]
        n, ch, h, w = lo.shape
        kk = kernel[0] * kernel[1]
        tiled = (
            kernel == stride and pad == (0, 0) and dil == (1, 1)
            and h % kernel[0] == 0 and w % kernel[1] == 0
        )  # fmt: skip
        ho, wo = (h // kernel[0], w // kernel[1]) if tiled else (0, 0)

        def windows(t: Tensor) -> Tensor:  # (n, ch, h, w) -> (n, ch, kk, L)
            if tiled:  # non-overlapping windows: a reshape (much faster than unfold)
                t = t.view(n, ch, ho, kernel[0], wo, kernel[1]).permute(0, 1, 3, 5, 2, 4)
                return t.reshape(n, ch, kk, ho * wo)
            t = F.pad(t, (pad[1], pad[1], pad[0], pad[0]), value=-math.inf)
            return F.unfold(t, kernel, dilation=dil, stride=stride).view(n, ch, kk, -1)

        lw, uw = windows(lo), windows(hi)
        jstar = lw.argmax(2, keepdim=True)  # (n, ch, 1, L)
        l_best = lw.gather(2, jstar).squeeze(2)
        u_others = uw.scatter(2, jstar, -math.inf).amax(2)
        decided = (l_best >= u_others).to(lo.dtype)  # (n, ch, L): max is exactly z_j*
        u_max = uw.amax(2)
        onehot = torch.zeros_like(lw).scatter_(2, jstar, 1.0)  # (n, ch, kk, L)

        def route(a: Tensor) -> Tensor:  # coefficient on z_j* (n, s, ch, L) -> input shape
            s = a.shape[1]
            spread = a.unsqueeze(3) * onehot.unsqueeze(1)  # (n, s, ch, kk, L)
            if tiled:
                spread = spread.view(n, s, ch, kernel[0], kernel[1], ho, wo)
                return spread.permute(0, 1, 2, 5, 3, 6, 4).reshape(n, s, ch, h, w)
            folded = F.fold(
                spread.reshape(n * s, ch * kk, -1),
                (h + 2 * pad[0], w + 2 * pad[1]),
                kernel,
                dilation=dil,
                stride=stride,
            )
            return folded[:, :, pad[0] : pad[0] + h, pad[1] : pad[1] + w].reshape(n, s, ch, h, w)

        dec, umax = decided.unsqueeze(1), u_max.unsqueeze(1)
        l_in = u_in = lb = ub = None
        if la is not None:
            a = la.flatten(3)
            pos, neg = a.clamp_min(0), a.clamp_max(0)
            l_in = route(pos + neg * dec)
            lb = (neg * (1 - dec) * umax).flatten(2).sum(-1)
        if ua is not None:
            a = ua.flatten(3)
            pos, neg = a.clamp_min(0), a.clamp_max(0)
            u_in = route(neg + pos * dec)
            ub = (pos * (1 - dec) * umax).flatten(2).sum(-1)
        return [(l_in, u_in)], lb, ub

    def _feeds_pool(self, idx: int) -> bool:
        """Whether op ``idx`` feeds a max-pool, directly or through a ReLU."""
        return any(
            o.inputs[:1] == (idx,)
            and (o.kind == "maxpool" or (o.kind == "relu" and self._feeds_pool(o.index)))
            for o in self.ops
        )

    def _crown_intermediate(
        self, rec: _Record, bounds: dict[int, tuple[Tensor, Tensor]], xl: Tensor, xu: Tensor
    ) -> None:
        """Refine the bounds of every relaxed (ReLU / max-pool input) node by CROWN."""
        for idx in self._relaxed:
            op = self.ops[idx]
            if op.kind == "relu":  # a ReLU output: exact from its (refined) input bounds
                lo, hi = bounds[op.inputs[0]]
                bounds[idx] = (lo.clamp_min(0), hi.clamp_min(0))
                continue
            if op.kind == "input":
                continue
            zl, zu = bounds[idx]
            n = zl.shape[0]
            flat_l, flat_u = zl.flatten(1), zu.flatten(1)
            numel = flat_l.shape[1]
            if self._feeds_pool(idx):
                refine = torch.ones_like(flat_l, dtype=torch.bool)  # pooling uses every bound
            else:  # only an unstable ReLU input changes its relaxation
                refine = (flat_l < 0) & (flat_u > 0)
            counts = refine.sum(1)
            rows = int(counts.max()) if n else 0
            if rows == 0:
                continue
            # per sample, the indices of its neurons to refine first (padded rows are unused)
            order = torch.sort(refine.to(torch.int8), dim=1, descending=True, stable=True)[1]
            order = order[:, :rows]
            valid = torch.arange(rows, device=zl.device).unsqueeze(0) < counts.unsqueeze(1)
            widest = max(math.prod(rec.shapes[i][1:]) for i in range(idx + 1) if i in rec.shapes)
            chunk = max(1, _CHUNK_ELEMENTS // max(1, n * widest))
            new_l, new_u = flat_l.clone(), flat_u.clone()
            shape = rec.shapes[idx][1:]
            for start in range(0, rows, chunk):
                sel, ok = order[:, start : start + chunk], valid[:, start : start + chunk]
                a = torch.zeros(n, sel.shape[1], numel, dtype=zl.dtype, device=zl.device)
                a.scatter_(2, sel.unsqueeze(2), ok.to(zl.dtype).unsqueeze(2))
                a = a.view(n, sel.shape[1], *shape)
                lo, hi = self._backward(rec, idx, a, a, bounds, xl, xu)
                assert lo is not None and hi is not None
                old_l, old_u = new_l.gather(1, sel), new_u.gather(1, sel)
                new_l = new_l.scatter(1, sel, torch.where(ok, torch.maximum(old_l, lo), old_l))
                new_u = new_u.scatter(1, sel, torch.where(ok, torch.minimum(old_u, hi), old_u))
            bounds[idx] = (new_l.view_as(zl), new_u.view_as(zu))

    # ------------------------------------------------------------------ public API
    def compute(
        self,
        x: Tensor,
        eps: float | str,
        *,
        method: str = "ibp",
        spec: Tensor | None = None,
        labels: Tensor | None = None,
        upper: bool = True,
        subset: Tensor | None = None,
        intersect: bool = True,
    ) -> BoundResult:
        """Clean logits and bounds of ``C @ logits`` over ``{x' : |x' - x|_inf <= eps} ∩ [0,1]``.

        Args:
            x: inputs (N, spec, H, W) in [0, 1]; the model is run in its current mode (train
                mode: BatchNorm uses the clean batch's statistics, also for the bounds).
            eps: L∞ radius in input units, in [0, 1] (``"8/255"`` accepted).
            method: ``"ibp"``, ``"crown-ibp"`` or ``"crown"``.
            spec: specification (M, S, K) for the bounded rows; None bounds the logits.
            labels: (M,) labels of the bounded rows: bound the margins ``z_y - z_j``
                (``spec = margin_spec(labels, K)``; the bound of row ``y`` is 0).
            upper: also compute upper bounds (verification needs only the lower ones).
            subset: indices of the rows of ``x`` to bound (M of them); the clean pass, and so
                BatchNorm's batch statistics, still uses all of ``x``.
            intersect: return the intersection with IBP's bounds (never looser than IBP);
                False returns the raw CROWN / CROWN-IBP bounds.

        Returns:
            :class:`BoundResult`, float32 (autocast is switched off inside).
        """
        method = check_bound_method(method)
        eps_v = check_eps(eps, "linf")
        device_type = x.device.type
        with torch.autocast(device_type, enabled=False):
            x = x.float()
            if method == "crown":
                self.check_method("crown", tuple(x.shape[1:]))
            rec = self._clean_pass(x)
            xb = x if subset is None else x[subset]
            xl, xu = (xb - eps_v).clamp(0, 1), (xb + eps_v).clamp(0, 1)
            if labels is not None:
                if spec is not None:
                    raise ConfigError("pass either spec or labels, not both")
                spec = margin_spec(labels, rec.clean.shape[1])
            if spec is not None:
                spec = spec.float()
                if spec.shape[0] != xb.shape[0]:
                    raise ConfigError(
                        f"spec has {spec.shape[0]} rows of specs for {xb.shape[0]} inputs"
                    )
            bounds, (ilo, ihi) = self._ibp(rec, xl, xu, spec)
            if method == "ibp":
                return BoundResult(rec.clean, ilo, ihi if upper else None, ilo, ihi)
            if method == "crown":
                self._crown_intermediate(rec, bounds, xl, xu)
            k = rec.shapes[self.output][1:]
            if spec is None:
                eye = torch.eye(math.prod(k), device=x.device)
                spec = eye.view(1, -1, *k).expand(xb.shape[0], -1, *k)
            lo, hi = self._backward(rec, self.output, spec, spec if upper else None, bounds, xl, xu)
            assert lo is not None
            if intersect:
                lo = torch.maximum(lo, ilo)
                hi = torch.minimum(hi, ihi) if hi is not None else None
            return BoundResult(rec.clean, lo, hi, ilo, ihi)

    def bounds(
        self, x: Tensor, eps: float | str, method: str = "ibp", spec: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(lower, upper) of ``C @ logits`` (or the logits) over the eps-ball of ``x``."""
        result = self.compute(x, eps, method=method, spec=spec)
        assert result.upper is not None
        return result.lower, result.upper


def _reshape_coef(a: Tensor | None, in_shape: tuple[int, ...]) -> Tensor | None:
    return None if a is None else a.reshape(*a.shape[:2], *in_shape)


def _bn_affine(m: nn.Module, inp: Tensor) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` per channel of BatchNorm ``m`` as it will act on ``inp``."""
    assert isinstance(m, nn.modules.batchnorm._BatchNorm)
    if m.training or m.running_mean is None:
        dims = [d for d in range(inp.dim()) if d != 1]
        mean = inp.mean(dims)
        var = inp.var(dims, unbiased=False)
    else:
        mean, var = m.running_mean, m.running_var
        assert var is not None
    scale = torch.rsqrt(var + m.eps)
    if m.weight is not None:
        scale = scale * m.weight
    shift = -mean * scale
    if m.bias is not None:
        shift = shift + m.bias
    return scale, shift


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
