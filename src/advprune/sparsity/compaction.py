"""Physical structured pruning: turn a filters / channels-masked model into a thinner plain one.

:func:`compact` removes every channel whose removal provably leaves the masked model's output
unchanged, using Torch-Pruning's dependency graph (DepGraph) to find what is coupled: a
convolution's filters, the BatchNorm after it, every layer that reads those channels, and
everything joined to them by residual additions, shortcuts and flattening into the classifier.

A channel (one index of a DepGraph group) is removed when

- **no layer reads it**: every consumer's weights for it are zero (a ``channels`` mask), or
- **it carries a constant**: every producer's weights for it are zero (a ``filters`` mask), so
  what reaches the consumers is a constant (the BatchNorm shift, through ReLU and pooling).
  A linear layer or an unpadded convolution that reads it gets the constant folded into its
  bias. A padded convolution cannot (zero padding makes a constant input border-dependent):
  the constants of all removed channels it reads are merged into the weights of one kept
  constant channel (``w_j += (c_k / c_j) w_k``), the *carrier*, so one channel per group (a
  few where residual blocks see different constants) stays instead of all of them.

Otherwise the channel is kept, and :class:`CompactRecord` says per layer which masked units
were kept and why (for example a residual stream channel that one block's mask removes but
another block still reads: the union of what the group's layers need is kept). The model's
logits (the last conv / linear layer's outputs) and input channels are never removed.

The compacted model is a plain ``nn.Module`` of the same class with smaller layers; its widths
record (:meth:`CompactRecord.widths`) rebuilds it from a fresh instance of the architecture with
:func:`build_compacted`, which does not need Torch-Pruning.
"""

from __future__ import annotations

import copy
import functools
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from advprune.errors import AdvpruneError, CheckpointError, ConfigError
from advprune.sparsity.masks import masked_modules
from advprune.sparsity.report import export_dense

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
_RESIZABLE = (nn.Conv2d, nn.Linear, *_BATCHNORMS)

#: compacted and masked logits agree when ``max |a - b| <= LOGITS_RTOL * max |b|`` (float32:
#: removing channels and folding constants change only the order of summation)
LOGITS_RTOL = 1e-4


class CompactionError(AdvpruneError):
    """The compacted model does not compute what the masked model computes."""


@dataclass
class LayerChange:
    """One conv / linear / BatchNorm layer before and after compaction.

    ``masked`` counts the units (filters or channels) the layer's own mask removed;
    ``kept_masked`` how many of them the compacted layer still has; ``notes`` say why, and
    which constants were folded into the layer's bias.
    """

    name: str
    type: str
    in_before: int
    in_after: int
    out_before: int
    out_after: int
    bias: bool
    granularity: str | None = None
    masked: int = 0
    kept_masked: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class CompactRecord:
    """What :func:`compact` did, layer by layer; ``widths()`` rebuilds the compacted model."""

    layers: list[LayerChange] = field(default_factory=list)

    def widths(self) -> dict[str, dict[str, Any]]:
        """JSON-able ``{module name: shape}`` for :func:`build_compacted`, every resizable layer.

        Conv2d / Linear: ``{"type", "in", "out", "bias"}``; BatchNorm: ``{"type", "features"}``.
        """
        out: dict[str, dict[str, Any]] = {}
        for layer in self.layers:
            if layer.type.startswith("BatchNorm"):
                out[layer.name] = {"type": layer.type, "features": layer.out_after}
            else:
                out[layer.name] = {
                    "type": layer.type,
                    "in": layer.in_after,
                    "out": layer.out_after,
                    "bias": layer.bias,
                }
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: per-layer rows and the widths spec."""
        return {"layers": [asdict(layer) for layer in self.layers], "widths": self.widths()}

    def format(self) -> str:
        """A plain-text table of the layers that changed or kept masked units, with notes."""
        head = f"{'layer':<28} {'type':<11} {'in':>11} {'out':>11} {'kept masked':>12}"
        rows = [head, "-" * len(head)]
        for r in self.layers:
            if (r.in_before, r.out_before) == (r.in_after, r.out_after) and not r.notes:
                continue
            kept = f"{r.kept_masked}/{r.masked}" if r.granularity else ""
            rows.append(
                f"{r.name:<28} {r.type:<11} {f'{r.in_before}->{r.in_after}':>11} "
                f"{f'{r.out_before}->{r.out_after}':>11} {kept:>12}"
            )
            rows.extend(f"    {note}" for note in r.notes)
        return "\n".join(rows)


def _import_torch_pruning() -> Any:
    try:
        import torch_pruning
    except ImportError:
        raise ConfigError(
            "compacting a model needs Torch-Pruning: pip install torch-pruning"
        ) from None
    return torch_pruning


def _example_inputs(model: nn.Module, example_inputs: torch.Tensor | None) -> torch.Tensor:
    if example_inputs is not None:
        return example_inputs
    spec = getattr(model, "spec", None)
    if spec is None:
        raise ConfigError(
            f"{type(model).__name__} has no advprune model spec; pass example_inputs "
            "(a batch of inputs in [0, 1]) to compact it"
        )
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    return torch.rand(2, *spec.input_size, generator=generator).to(device)


def _listing(names: Sequence[str], limit: int = 2) -> str:
    names = list(dict.fromkeys(names))
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _is_padded(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and (
        module.padding == "same" or any(int(p) != 0 for p in module.padding)
    )


def _can_fold(module: nn.Module) -> bool:
    """Whether a constant input channel can be folded exactly into the module's bias."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1 and not _is_padded(module)


@dataclass
class _Member:
    name: str
    module: nn.Module
    idxs: list[int]  # indices in this member's own dimension
    root: list[int]  # the group's root channel of each index

    @functools.cached_property
    def slices(self) -> dict[int, list[int]]:
        """``{root channel: [indices in this member]}``."""
        out: dict[int, list[int]] = {}
        for idx, root in zip(self.idxs, self.root):
            out.setdefault(root, []).append(idx)
        return out


@dataclass
class _Group:
    root_module: nn.Module
    root_fn: Any
    size: int
    writers: list[_Member]
    readers: list[_Member]
    norms: list[_Member]
    unhandled: str | None  # a member compaction cannot reason about (kept whole)


def _groups(tp: Any, graph: Any, model: nn.Module, logits: nn.Module) -> list[_Group]:
    names = {m: n for n, m in model.named_modules()}
    out = []
    for group in graph.get_all_groups(
        ignored_layers=[logits], root_module_types=(nn.Conv2d, nn.Linear)
    ):
        items = list(group)
        g = _Group(
            root_module=items[0].dep.target.module,
            root_fn=items[0].dep.handler,
            size=len(items[0].idxs),
            writers=[],
            readers=[],
            norms=[],
            unhandled=None,
        )
        handled = {
            getattr(tp.ops.OPTYPE, t) for t in ("CONV", "LINEAR", "BN", "ELEMENTWISE", "RESHAPE")
        }
        for item in items:
            module = item.dep.target.module
            kind = item.dep.target.type
            if kind == tp.ops.OPTYPE.OUTPUT:
                g.unhandled = "reaches the model's output"
            elif kind not in handled or (isinstance(module, nn.Conv2d) and module.groups != 1):
                g.unhandled = (
                    f"is coupled to a {type(module).__name__} that compaction leaves whole"
                )
            if not isinstance(module, _RESIZABLE):
                continue
            member = _Member(names[module], module, list(item.idxs), list(item.root_idxs))
            if isinstance(module, _BATCHNORMS):
                g.norms.append(member)
            elif graph.is_out_channel_pruning_fn(item.dep.handler):
                g.writers.append(member)
            elif graph.is_in_channel_pruning_fn(item.dep.handler):
                g.readers.append(member)
        out.append(g)
    return out


def _nonzero_roots(member: _Member, dim: int) -> set[int]:
    """Root channels whose weight slices (dim 0: filters, 1: input channels) are not all 0."""
    used = member.module.weight.detach().ne(0).transpose(0, dim).flatten(1).any(1).cpu()
    roots = torch.tensor(member.root)[used[torch.tensor(member.idxs)]]
    return set(roots.unique().tolist())


def _channel_constants(probe: torch.Tensor) -> list[float | None]:
    """Per input channel of a probe batch: its constant value, or None where it varies."""
    per_channel = probe.detach().transpose(0, 1).flatten(1).double().cpu()
    first = per_channel[:, :1]
    scale = per_channel.abs().amax(1).clamp(min=1.0)
    constant = (per_channel - first).abs().amax(1) <= 1e-6 * scale
    return [float(v) if c else None for v, c in zip(first[:, 0].tolist(), constant.tolist())]


@dataclass
class _Edit:
    """Weight / bias edits of one reader that make removing constant channels exact."""

    bias: list[tuple[int, float]] = field(default_factory=list)  # (input index, constant)
    merge: list[tuple[int, int, float]] = field(default_factory=list)  # (carrier, index, ratio)


@dataclass
class _Decision:
    remove: list[int]
    edits: dict[str, _Edit]  # reader name -> edits
    kept_why: dict[int, str]  # root channel -> why it is kept


def _carriers(
    needs: Mapping[int, Mapping[str, tuple[int, float]]],
) -> dict[str, int]:
    """Choose kept constant channels that carry the merged constants into padded convs.

    ``needs[r][reader] = (index, constant)`` for every constant channel ``r`` whose non-zero
    constant a padded conv reads. Greedy cover: the channel serving the most uncovered
    readers first (ties: the largest smallest |constant|, for the best-conditioned ratios).
    Returns ``{reader: carrier root channel}``.
    """
    uncovered = {rd for per in needs.values() for rd in per}
    serving: dict[str, int] = {}
    while uncovered:
        best = max(
            needs,
            key=lambda r: (
                len(uncovered & set(needs[r])),
                min((abs(needs[r][rd][1]) for rd in uncovered & set(needs[r])), default=0.0),
                -r,
            ),
        )
        for rd in uncovered & set(needs[best]):
            serving[rd] = best
        uncovered -= set(needs[best])
    return serving


def _decide(
    g: _Group, constants_of: Mapping[str, list[float | None]], round_to: int | None
) -> _Decision:
    """Which of the group's channels to remove, the reader edits that keep that exact, and
    why the others stay."""
    written: dict[int, list[str]] = {}
    for w in g.writers:
        for r in _nonzero_roots(w, 0):
            written.setdefault(r, []).append(w.name)
    read: dict[int, list[_Member]] = {}
    for rd in g.readers:
        for r in _nonzero_roots(rd, 1):
            read.setdefault(r, []).append(rd)
    kept_why: dict[int, str] = {}
    removable: set[int] = set()
    # constant channel -> reader -> [(index, constant)] of its non-zero constants
    constants: dict[int, dict[str, list[tuple[int, float]]]] = {}
    needs: dict[int, dict[str, tuple[int, float]]] = {}  # read by padded convs
    for r in range(g.size):
        readers = read.get(r, [])
        if g.unhandled:
            kept_why[r] = g.unhandled
        elif not readers:
            removable.add(r)
        elif r in written:
            kept_why[r] = (
                f"written by {_listing(written[r])} and read by "
                f"{_listing([m.name for m in readers])}"
            )
        else:
            per: dict[str, list[tuple[int, float]]] = {}
            for rd in readers:
                for idx in rd.slices[r]:
                    value = constants_of[rd.name][idx]
                    if value is None:
                        kept_why[r] = f"varies although no layer writes it (read by {rd.name})"
                    elif value != 0.0:
                        per.setdefault(rd.name, []).append((idx, value))
                        if not _can_fold(rd.module):
                            needs.setdefault(r, {})[rd.name] = (idx, value)
            if r not in kept_why:
                constants[r] = per
                removable.add(r)
    serving = _carriers(needs)
    for r in set(serving.values()):
        removable.discard(r)
        kept_why[r] = "carries the merged constants of removed channels into padded convs"
    if removable and len(removable) == g.size:  # a layer keeps at least one channel
        first = min(removable)
        kept_why[first] = "every channel of the group is removable; one is kept"
        removable.discard(first)
    if round_to and removable:
        keep = g.size - len(removable)
        target = min(g.size, math.ceil(keep / round_to) * round_to)
        for r in sorted(removable, key=lambda r: (r in constants, r))[: target - keep]:
            kept_why[r] = f"kept to round the width to a multiple of {round_to}"
            removable.discard(r)
    edits: dict[str, _Edit] = {}
    for r in removable:
        for name, values in constants.get(r, {}).items():
            edit = edits.setdefault(name, _Edit())
            if name in serving:
                carrier_idx, carrier_value = needs[serving[name]][name]
                edit.merge.extend((carrier_idx, i, v / carrier_value) for i, v in values)
            else:
                edit.bias.extend(values)
    return _Decision(sorted(removable), edits, kept_why)


@torch.no_grad()
def _apply(module: nn.Module, edit: _Edit) -> None:
    """Fold constant input channels into ``module``'s bias, or merge them into a carrier
    channel's weights (sums in float64)."""
    weight = module.weight.detach()
    device = weight.device
    if edit.merge:
        carriers = torch.tensor([c for c, _, _ in edit.merge], device=device)
        idxs = torch.tensor([i for _, i, _ in edit.merge], device=device)
        ratios = torch.tensor([r for _, _, r in edit.merge], dtype=torch.float64, device=device)
        ratios = ratios.view(1, -1, *([1] * (weight.dim() - 2)))
        delta = weight.index_select(1, idxs).double() * ratios
        touched = carriers.unique()
        new = torch.zeros_like(weight, dtype=torch.float64)
        new.index_add_(1, carriers, delta)
        columns = weight.index_select(1, touched).double() + new.index_select(1, touched)
        weight.index_copy_(1, touched, columns.to(weight.dtype))
    if edit.bias:
        idxs = torch.tensor([i for i, _ in edit.bias], device=device)
        values = torch.tensor([v for _, v in edit.bias], dtype=torch.float64, device=device)
        columns = weight.index_select(1, idxs).double()
        if columns.dim() > 2:  # a conv without padding: every tap sees the constant
            columns = columns.flatten(2).sum(2)
        add = columns @ values
        if module.bias is None:
            module.bias = nn.Parameter(add.to(weight.dtype))
        else:
            module.bias.copy_((module.bias.double() + add).to(module.bias.dtype))


def _shape(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.num_features, module.num_features


def _capture_inputs(model: nn.Module, x: torch.Tensor, names: set[str]) -> dict[str, torch.Tensor]:
    probes: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if name in names:

            def hook(mod: nn.Module, args: tuple, name: str = name) -> None:
                probes[name] = args[0].detach()

            hooks.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return probes


def _mask_units(model: nn.Module) -> dict[str, tuple[str, set[int]]]:
    """``{layer: (granularity, removed unit indices)}`` of every filters / channels mask."""
    out = {}
    for name, (_, mask) in masked_modules(model).items():
        if mask.granularity in ("filters", "channels"):
            removed = mask.compact_mask().detach().eq(0).nonzero().flatten().tolist()
            out[name] = (mask.granularity, set(removed))
    return out


def logits_close(compacted: torch.Tensor, masked: torch.Tensor) -> tuple[bool, float]:
    """Whether two logit batches agree within :data:`LOGITS_RTOL`; also the max difference."""
    diff = float((compacted.float() - masked.float()).abs().max())
    return diff <= LOGITS_RTOL * float(masked.abs().max()), diff


def compact(
    model: nn.Module,
    example_inputs: torch.Tensor | None = None,
    *,
    round_to: int | None = None,
    verify: bool = True,
) -> tuple[nn.Module, CompactRecord]:
    """A physically thinner copy of a filters / channels-masked model, and what was done.

    ``model`` is left unchanged. Masks are folded in first (unstructured masks stay zeros in
    the weights; only whole channels are removed). ``example_inputs`` (default: two uniform
    inputs of the model spec's input size) trace the dependency graph and give the constants
    to fold. ``round_to`` keeps a few more channels so each width is a multiple of it (faster
    kernels on some hardware; never changes the output). With ``verify`` (default) the
    compacted and masked models' logits on ``example_inputs`` must agree within
    :data:`LOGITS_RTOL`, else :class:`CompactionError`. The result is in eval mode.
    """
    tp = _import_torch_pruning()
    if round_to is not None and (isinstance(round_to, bool) or int(round_to) < 1):
        raise ConfigError(f"round_to must be an integer >= 1, got {round_to!r}")
    x = _example_inputs(model, example_inputs)
    units = _mask_units(model)
    thin = export_dense(copy.deepcopy(model)).eval()
    layers = [(n, m) for n, m in thin.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no conv or linear layer to compact")
    before = {n: _shape(m) for n, m in thin.named_modules() if isinstance(m, _RESIZABLE)}
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            reference = model(x)
    finally:
        for m, mode in modes.items():
            m.training = mode
    graph = tp.DependencyGraph().build_dependency(thin, example_inputs=x, verbose=False)
    groups = _groups(tp, graph, thin, layers[-1][1])
    probes = _capture_inputs(thin, x, {n for n, _ in layers})
    constants_of = {name: _channel_constants(p) for name, p in probes.items()}
    decisions = [_decide(g, constants_of, round_to) for g in groups]
    modules = dict(thin.named_modules())
    edits: dict[str, _Edit] = {}
    for d in decisions:
        for name, edit in d.edits.items():
            _apply(modules[name], edit)
            edits[name] = edit
    for g, d in zip(groups, decisions):
        if d.remove:
            graph.get_pruning_group(g.root_module, g.root_fn, d.remove).prune()
    ends = (layers[0][0], layers[-1][0])
    record = _record(thin, before, units, groups, decisions, edits, ends)
    if verify:
        with torch.no_grad():
            ok, diff = logits_close(thin(x), reference)
        if not ok:
            raise CompactionError(
                f"compacted {type(model).__name__} differs from the masked model by {diff:.3g} "
                f"in the logits (tolerance {LOGITS_RTOL:g} relative); not using it"
            )
    return thin, record


def _record(
    thin: nn.Module,
    before: Mapping[str, tuple[int, int]],
    units: Mapping[str, tuple[str, set[int]]],
    groups: Sequence[_Group],
    decisions: Sequence[_Decision],
    edits: Mapping[str, _Edit],
    ends: tuple[str, str],
) -> CompactRecord:
    # why each (layer, dim, index) was kept, from the groups it belongs to
    why: dict[tuple[str, int], dict[int, str]] = {}
    for g, d in zip(groups, decisions):
        for dim, members in ((0, g.writers), (1, g.readers)):
            for m in members:
                for root, idxs in m.slices.items():
                    if root in d.kept_why:
                        for idx in idxs:
                            why.setdefault((m.name, dim), {})[idx] = d.kept_why[root]
    record = CompactRecord()
    for name, module in thin.named_modules():
        if not isinstance(module, _RESIZABLE):
            continue
        in_b, out_b = before[name]
        in_a, out_a = _shape(module)
        change = LayerChange(
            name=name,
            type=type(module).__name__,
            in_before=in_b,
            in_after=in_a,
            out_before=out_b,
            out_after=out_a,
            bias=getattr(module, "bias", None) is not None,
        )
        if name in units:
            granularity, removed = units[name]
            dim = 0 if granularity == "filters" else 1
            reasons: Counter[str] = Counter()
            for idx in sorted(removed):
                if (name, dim) in why and idx in why[(name, dim)]:
                    reasons[why[(name, dim)][idx]] += 1
                elif dim == 0 and name == ends[1]:
                    reasons["are logits of the model (never removed)"] += 1
                elif dim == 1 and name == ends[0]:
                    reasons["are input channels of the model (never removed)"] += 1
            kind = "filters" if dim == 0 else "channels"
            change.granularity, change.masked = granularity, len(removed)
            change.kept_masked = sum(reasons.values())
            change.notes = [f"{n} masked {kind} kept: {r}" for r, n in reasons.most_common()]
        edit = edits.get(name)
        if edit is not None and edit.bias:
            change.notes.append(
                f"the constants of {len(edit.bias)} removed inputs folded into the bias"
            )
        if edit is not None and edit.merge:
            carriers = len({c for c, _, _ in edit.merge})
            change.notes.append(
                f"the constants of {len(edit.merge)} removed input channels merged into "
                f"{carriers} kept constant channel(s)"
            )
        record.layers.append(change)
    return record


def _resized(module: nn.Module, width: Mapping[str, Any], name: str) -> nn.Module:
    kind = type(module).__name__
    if width.get("type") != kind:
        raise CheckpointError(
            f"compacted layer {name!r} is recorded as {width.get('type')!r} but the "
            f"architecture has a {kind} there; the widths belong to another model"
        )
    try:
        if isinstance(module, nn.Conv2d):
            return nn.Conv2d(
                int(width["in"]),
                int(width["out"]),
                module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                groups=module.groups,
                bias=bool(width["bias"]),
                padding_mode=module.padding_mode,
                device=module.weight.device,
            )
        if isinstance(module, nn.Linear):
            return nn.Linear(
                int(width["in"]),
                int(width["out"]),
                bias=bool(width["bias"]),
                device=module.weight.device,
            )
        return type(module)(
            int(width["features"]),
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"compacted layer {name!r} has a malformed width {dict(width)}: {exc}"
        ) from None


def build_compacted(model: nn.Module, widths: Mapping[str, Mapping[str, Any]]) -> nn.Module:
    """Resize a fresh instance of the architecture to a compacted model's recorded ``widths``.

    ``model`` comes from the model spec (``ModelSpec.build()``); each conv / linear /
    BatchNorm named in ``widths`` (:meth:`CompactRecord.widths`) is replaced by a new module of
    the recorded shape, keeping kernel size, stride, padding and BatchNorm settings. Load the
    compacted state dict into the result with ``strict=True``. Needs no Torch-Pruning.
    """
    if not isinstance(widths, Mapping):
        raise CheckpointError(f"compacted widths must be a mapping, got {type(widths).__name__}")
    modules = dict(model.named_modules())
    for name, width in widths.items():
        module = modules.get(name)
        if not isinstance(module, _RESIZABLE):
            raise CheckpointError(
                f"compacted layer {name!r} is not a conv, linear or BatchNorm layer of "
                f"{type(model).__name__}; the widths belong to another model"
            )
        if not isinstance(width, Mapping):
            raise CheckpointError(f"compacted layer {name!r} has a malformed width {width!r}")
        parent, _, child = name.rpartition(".")
        setattr(
            model.get_submodule(parent) if parent else model, child, _resized(module, width, name)
        )
    return model


def layer_widths(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every conv / linear / BatchNorm layer's shape in :meth:`CompactRecord.widths` form
    (what :func:`build_compacted` takes), read off ``model`` itself."""
    out: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if isinstance(module, _BATCHNORMS):
            out[name] = {"type": type(module).__name__, "features": module.num_features}
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            c_in, c_out = _shape(module)
            out[name] = {
                "type": type(module).__name__,
                "in": c_in,
                "out": c_out,
                "bias": module.bias is not None,
            }
    return out
