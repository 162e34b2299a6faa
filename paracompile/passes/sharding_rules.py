"""Token-axis propagation rules: one entry per aten op family, in one table.

A rule looks at one node of the aten graph and the token layouts of its tensor inputs, and answers how
the op runs on token shards: the layout of its output (or outputs), the layout each tensor input must
have (None: the full, replicated tensor), and, where shapes or offsets in the op's arguments refer to
the global token axis, how to rewrite them for the local shard. A rule that returns None declares the op
not token-local for these inputs: the pass then gathers the inputs and runs the op replicated.

Rules only ever see the original graph (global shapes in node.meta["val"]); they never emit nodes
themselves except through the `patch` callback, which the rewriter calls with a GraphBuilder.

Adding support for an op is one `@rule(...)` entry. Everything else the passes know about an op (it
mixes tokens; it is an attention kernel; a residual stream passes through it) is a `classify(...)` fact
in the same table, `REGISTRY`, keyed by OpOverload (`describe_registry()` prints it sorted). The shape of
this module follows torch/distributed/tensor/_ops/ (DTensor's sharding propagation).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from paracompile.passes.token_layout import Size, TokenLayout, known_nonnegative, product, same_size

aten = torch.ops.aten

Layout = Optional[TokenLayout]

# Required layout for an input whose values the op never reads (only its dtype or device): whichever
# representation exists is passed, with no communication.
ANY = "any"


@dataclass
class Sharding:
    """How one op runs on shards. `inputs` maps argument names to the layout required of them (a list for
    list arguments); tensor arguments that are not named must be replicated. `patch(builder, args, local)`
    returns the op's arguments for the local shard: `args` are the rewritten arguments by name and `local`
    answers questions about this rank's shard (see LocalShard in shard_tokens.py)."""

    output: Any
    inputs: dict[str, Any] = field(default_factory=dict)
    patch: Optional[Callable] = None
    # The op reduces over the token axis of its sharded inputs (a contraction of inputs split alike, a sum, a
    # max): each rank's result is its shards' share, "sum", "max" or "min", and the rewriter all-reduces it
    # with that op into the full (replicated) result. `output` is then None.
    partial: Optional[str] = None


def gather_to_change(node: fx.Node, layout: TokenLayout, have: Layout) -> int:
    """The cost of giving `node` (held with layout `have`) the layout `layout`, without knowing more: 0 when
    it already has it, else 1 (a gather, then a slice)."""
    return 0 if have is not None and have == layout else 1


class OpView:
    """Read access to one node: arguments by schema name, global shapes, and the current input layouts.

    `cost(node, layout)` says what giving an input another layout costs (0: nothing, or a slice of a full
    value the pass still holds; 1: a gather): the rewriter knows which values it holds whole."""

    def __init__(self, node: fx.Node, layout_of: Callable[[fx.Node], Layout],
                 cost: Optional[Callable[[fx.Node, TokenLayout], int]] = None):
        self.node = node
        self.layout_of = layout_of
        self.cost = cost or (lambda value, layout: gather_to_change(value, layout, layout_of(value)))
        schema = node.target._schema
        self.args: dict[str, Any] = {}
        for index, argument in enumerate(schema.arguments):
            if index < len(node.args):
                self.args[argument.name] = node.args[index]
            elif argument.name in node.kwargs:
                self.args[argument.name] = node.kwargs[argument.name]
            elif argument.has_default_value():
                self.args[argument.name] = argument.default_value
            else:
                self.args[argument.name] = None

    def __getitem__(self, name: str) -> Any:
        """The argument, with SymInt-valued nodes replaced by their (global) SymInt."""
        return _symbolic_value(self.args[name])

    def layout(self, name: str) -> Layout:
        value = self.args[name]
        return self.layout_of(value) if isinstance(value, fx.Node) else None

    def shape(self, value: Any) -> tuple[Size, ...]:
        return tuple(value.meta["val"].shape)

    @property
    def out_shape(self) -> tuple[Size, ...]:
        return tuple(self.node.meta["val"].shape)

    def tensor_args(self) -> list[str]:
        return [name for name, value in self.args.items() if is_tensor_node(value)]


def _symbolic_value(value: Any) -> Any:
    if isinstance(value, fx.Node) and not isinstance(value.meta.get("val"), torch.Tensor):
        return value.meta.get("val", value)
    if isinstance(value, (list, tuple)):
        return type(value)(_symbolic_value(v) for v in value)
    return value


def is_tensor_node(value: Any) -> bool:
    return isinstance(value, fx.Node) and isinstance(value.meta.get("val"), torch.Tensor)


Rule = Callable[[OpView], Optional[Sharding]]


@dataclass
class OpEntry:
    """Everything the passes know about one aten OpOverload."""

    rule: Optional[Rule] = None  # how it runs on token shards (None: it never does)
    declines_when: str = ""  # for the explanation: what makes it not token-local when its rule returns None
    mixes_tokens: Optional[str] = None  # it never runs on shards, and why, said plainly in the explanation
    attention_kernel: bool = False  # what attention becomes in a rewritten graph (First Block Cache finds blocks by it)
    residual_passthrough: bool = False  # a residual stream goes through it unchanged in value (up to dtype) and shape
    size_query: bool = False  # it reads a tensor's size, never its values (its result is a SymInt)


# The one table of op knowledge, keyed by OpOverload: a packet named at registration stands for every one of
# its overloads, so lookups never filter overloads by hand.
REGISTRY: dict[torch._ops.OpOverload, OpEntry] = {}


def overloads(*ops) -> list[torch._ops.OpOverload]:
    """The OpOverloads `ops` name: an OpOverload itself, or every overload of an OpOverloadPacket."""
    found = []
    for op in ops:
        if isinstance(op, torch._ops.OpOverloadPacket):
            found.extend(getattr(op, name) for name in op.overloads())
        elif isinstance(op, torch._ops.OpOverload):
            found.append(op)
        else:
            raise TypeError(f"paracompile: the op registry takes aten ops (OpOverload or OpOverloadPacket), got {op!r}")
    return found


def _entries(*ops) -> list[OpEntry]:
    return [REGISTRY.setdefault(op, OpEntry()) for op in overloads(*ops)]


def rule(*ops, declines_when: str = "its inputs are split in a way it cannot follow"):
    """Registers a rule for the given ops (every overload of a packet). `declines_when` says, for the
    explanation, what makes the op not token-local when the rule returns None."""

    def register(function):
        for entry in _entries(*ops):
            entry.rule, entry.declines_when = function, declines_when
        return function

    return register


_FACTS = tuple(name for name in OpEntry.__dataclass_fields__ if name not in ("rule", "declines_when"))


def classify(*ops, **facts) -> None:
    """Records facts (OpEntry fields other than the rule) about the given ops."""
    unknown = sorted(set(facts) - set(_FACTS))
    if unknown:
        raise TypeError(f"paracompile: {unknown[0]!r} is no op fact; facts are {', '.join(_FACTS)}")
    for entry in _entries(*ops):
        for name, value in facts.items():
            setattr(entry, name, value)


def entry_for(target: Any) -> Optional[OpEntry]:
    return REGISTRY.get(target) if isinstance(target, torch._ops.OpOverload) else None


def rule_for(node: fx.Node) -> Optional[Rule]:
    entry = entry_for(node.target)
    return entry.rule if entry is not None else None


def why_not_local(target: Any) -> Optional[str]:
    """Why an op with these inputs runs replicated, or None when the registry knows nothing of it."""
    entry = entry_for(target)
    if entry is None or (entry.rule is None and entry.mixes_tokens is None):
        return None
    return entry.mixes_tokens or entry.declines_when or "not token-local for these inputs"


def is_attention_kernel(target: Any) -> bool:
    entry = entry_for(target)
    return entry is not None and entry.attention_kernel


def passes_residual_through(target: Any) -> bool:
    entry = entry_for(target)
    return entry is not None and entry.residual_passthrough


def is_size_query(target: Any) -> bool:
    entry = entry_for(target)
    return entry is not None and entry.size_query


def describe_registry() -> str:
    """The table, one line per OpOverload, sorted by name: what the passes know about each op."""
    lines = []
    for op in sorted(REGISTRY, key=str):
        entry = REGISTRY[op]
        facts = [f"rule {entry.rule.__name__}" if entry.rule else "no rule"]
        facts += [f"mixes tokens ({entry.mixes_tokens})"] if entry.mixes_tokens else []
        facts += ["attention kernel"] if entry.attention_kernel else []
        facts += ["residual pass-through"] if entry.residual_passthrough else []
        facts += ["size query"] if entry.size_query else []
        lines.append(f"{op}: {', '.join(facts)}")
    return "\n".join(lines)


def keeps_token_axis(*packets, input_name: str = "self", declines_when: str):
    """Registers a rule for an op with one sharded input whose output keeps the token axis whole: the
    decorated function maps (view, the input's layout) to the output's token dim, or None to decline."""

    def register(output_dim):
        def propagate(view: OpView) -> Optional[Sharding]:
            layout = view.layout(input_name)
            if layout is None:
                return None
            dim = output_dim(view, layout)
            if dim is None:
                return None
            return Sharding(layout.at_dim(dim), {input_name: layout})

        propagate.__name__ = output_dim.__name__
        propagate.__doc__ = output_dim.__doc__
        return rule(*packets, declines_when=declines_when)(propagate)

    return register


def normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


# ----------------------------------------------------------------------------------------------------
# Pointwise ops: the token axis lines up across broadcast inputs, and inputs whose aligned dim has
# size 1 (or that lack it) stay replicated.

POINTWISE = [
    aten.add, aten.sub, aten.mul, aten.div, aten.neg, aten.pow, aten.exp, aten.exp2, aten.expm1, aten.log,
    aten.log1p, aten.log2, aten.cos, aten.sin, aten.tan, aten.tanh, aten.sigmoid, aten.silu, aten.gelu,
    aten.relu, aten.leaky_relu, aten.elu, aten.hardswish, aten.hardsigmoid, aten.mish, aten.softplus,
    aten.rsqrt, aten.sqrt, aten.square, aten.abs, aten.sign, aten.erf, aten.reciprocal, aten.floor,
    aten.ceil, aten.round, aten.trunc, aten.frac, aten.clamp, aten.clamp_min, aten.clamp_max, aten.clip,
    aten.maximum, aten.minimum, aten.fmod, aten.remainder, aten.floor_divide, aten.where, aten.masked_fill,
    aten.lerp, aten.addcmul, aten.addcdiv, aten.eq, aten.ne, aten.lt, aten.le, aten.gt, aten.ge,
    aten.logical_and, aten.logical_or, aten.logical_not, aten.logical_xor, aten.bitwise_and,
    aten.bitwise_or, aten.bitwise_not, aten.isnan, aten.isinf, aten.nan_to_num, aten.to, aten._to_copy,
    aten.clone, aten.contiguous, aten.alias, aten.detach, aten.dropout, aten.native_dropout,
    aten.zeros_like, aten.ones_like, aten.empty_like, aten.full_like, aten.rand_like, aten.randn_like,
    aten.copy_, aten.add_, aten.sub_, aten.mul_, aten.div_, aten.masked_fill_, aten.clamp_, aten.fill_,
    aten.addcmul_, aten.lerp_, aten.copy, aten.lift_fresh_copy, aten.bitwise_xor, aten.atan2, aten.sgn,
    aten.sinh, aten.cosh, aten.asin, aten.acos, aten.atan, aten.xlogy, aten.hypot, aten.heaviside,
]


@rule(*POINTWISE, declines_when="its inputs carry the token axis on dims that do not line up")
def pointwise(view: OpView) -> Optional[Sharding]:
    """Each sharded input's layout is a candidate for all of them; the one whose conversions of the other
    inputs cost least wins; on a tie, the one with more segments (a split per segment comes from a
    concatenation that later ops, attention among them, keep; a one-segment split is a source's default
    cut, which shard_tokens re-cuts to the segments its users need), then the first input's. So `cos * q`
    takes q's split (text and image segments) rather than re-splitting q to the rotary table's one
    segment, whatever the operand order (HiDream's rotary embedding)."""
    names = view.tensor_args()
    out_ndim = len(view.out_shape)
    best: Optional[tuple[tuple[int, int], Sharding]] = None
    for candidate_name in names:
        candidate = view.layout(candidate_name)
        if candidate is None:
            continue
        out_dim = candidate.dim + out_ndim - len(view.shape(view[candidate_name]))
        if out_dim < 0:
            continue
        inputs, cost = {}, 0
        for name in names:
            shape = view.shape(view[name])
            dim = out_dim - (out_ndim - len(shape))
            if dim >= 0 and not same_size(shape[dim], 1):
                inputs[name] = candidate.at_dim(dim)
                if view.layout(name) is not None or name == candidate_name:
                    cost += view.cost(view.args[name], inputs[name])
        rank = (cost, -len(candidate.segments))
        if best is None or rank < best[0]:
            best = (rank, Sharding(TokenLayout(out_dim, candidate.segments), inputs))
    return best[1] if best is not None else None


@rule(aten.type_as)
def type_as(view: OpView) -> Optional[Sharding]:
    layout = view.layout("self")
    if layout is None:
        return Sharding(None, {"self": None, "other": ANY})
    return Sharding(layout, {"self": layout, "other": ANY})


@rule(aten.new_zeros, aten.new_ones, aten.new_empty, aten.new_full, aten.new_empty_strided)
def new_tensor(view: OpView) -> Optional[Sharding]:
    """A fresh tensor of the given (global) size: only the dtype and device of `self` are read."""
    return Sharding(None, {"self": ANY})


@keeps_token_axis(aten.view_as_real, aten.view_as_complex, declines_when="the token axis is the last dim")
def complex_view(view: OpView, layout: TokenLayout) -> Optional[int]:
    return layout.dim if layout.dim < len(view.shape(view["self"])) - 1 else None


# ----------------------------------------------------------------------------------------------------
# Ops over feature dims: fine as long as the token axis is not among the dims they reduce.

@keeps_token_axis(aten.linear, input_name="input", declines_when="it contracts over the token axis")
def linear(view: OpView, layout: TokenLayout) -> Optional[int]:
    return layout.dim if layout.dim < len(view.shape(view["input"])) - 1 else None


@keeps_token_axis(aten.layer_norm, aten.rms_norm, input_name="input",
                  declines_when="it normalises over the token axis")
def norm_over_trailing_dims(view: OpView, layout: TokenLayout) -> Optional[int]:
    ndim = len(view.shape(view["input"]))
    return layout.dim if layout.dim < ndim - len(view["normalized_shape"]) else None


@keeps_token_axis(aten.group_norm, input_name="input", declines_when="it normalises over the token axis")
def group_norm(view: OpView, layout: TokenLayout) -> Optional[int]:
    return layout.dim if layout.dim == 0 else None


@keeps_token_axis(aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, aten.conv_transpose1d,
                  aten.conv_transpose2d, aten.conv_transpose3d, input_name="input",
                  declines_when="it convolves over the split axis")
def convolution(view: OpView, layout: TokenLayout) -> Optional[int]:
    """Dim 0 of a convolution is its batch: every entry is convolved on its own."""
    return 0 if layout.dim == 0 else None


@keeps_token_axis(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax, aten.cumsum, aten.cumprod,
                  aten.logcumsumexp, declines_when="it works along the token axis")
def along_one_dim(view: OpView, layout: TokenLayout) -> Optional[int]:
    along = normalize_dim(view["dim"], len(view.shape(view["self"])))
    return layout.dim if layout.dim != along else None


@rule(aten.sum, aten.mean, aten.amax, aten.amin, aten.var, aten.std, aten.logsumexp, aten.any, aten.all,
      aten.prod, aten.norm, aten.max, aten.min, aten.argmax, aten.argmin, aten.var_mean, aten.std_mean, declines_when="it reduces over the token axis")
def reduction(view: OpView) -> Optional[Sharding]:
    layout = view.layout("self")
    if layout is None:
        return None
    ndim = len(view.shape(view["self"]))
    dims = view.args.get("dim")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    dims = [normalize_dim(d, ndim) for d in dims] or list(range(ndim))  # none listed: every dim
    if layout.dim in dims:
        return _partial_reduction(view, layout, dims)
    keepdim = bool(view.args.get("keepdim", False))
    out_dim = layout.dim if keepdim else layout.dim - sum(1 for d in dims if d < layout.dim)
    output = TokenLayout(out_dim, layout.segments)
    if isinstance(view.node.meta["val"], (tuple, list)):  # max.dim, var_mean, ...: every output alike
        output = [output] * len(view.node.meta["val"])
    return Sharding(output, {"self": layout})


# Reductions over the token axis that each rank can do on its shard, completed by one all-reduce of the
# (small) result: the op the all-reduce applies.
_PARTIAL_REDUCTIONS = {aten.sum.default: "sum", aten.sum.dim_IntList: "sum", aten.mean.default: "sum",
                       aten.mean.dim: "sum", aten.amax.default: "max", aten.amin.default: "min",
                       aten.max.default: "max", aten.min.default: "min"}


def _partial_reduction(view: OpView, layout: TokenLayout, dims: list[int]) -> Optional[Sharding]:
    """A sum, mean, max or min over dims that include the token axis: each rank reduces its shard (a mean
    divides by the global count first) and the rewriter all-reduces the partial results, exactly what one
    process computes up to the order of a sum's terms; a max or min is exact. A torchao float8 per-tensor
    activation scale (the amax of |x| over the whole activation) is one: one all-reduce of a scalar instead
    of a gather of the activation. A rank that may hold no tokens reduces its shard padded with the op's
    identity (a max of nothing is an error)."""
    operation = _PARTIAL_REDUCTIONS.get(view.node.target)
    if operation is None:
        return None
    mean = view.node.target in (aten.mean.default, aten.mean.dim)
    shape = view.shape(view["self"])

    def patch(builder, args, local):
        tensor = args["self"]
        if mean:
            count = product([shape[d] for d in dims])
            tensor = builder.call(aten.div.Tensor, tensor, builder.size(count))
            args = {"self": tensor, "dim": dims, "keepdim": bool(view.args.get("keepdim", False)),
                    "dtype": args.get("dtype"), "__target__": aten.sum.dim_IntList}
        elif operation != "sum" and not (isinstance(local.length, int) and local.length > 0):
            args = dict(args, self=_padded_with_identity(builder, tensor, layout.dim, dims, ndim=len(shape),
                                                         operation=operation, dtype=view["self"].meta["val"].dtype))
        return args

    return Sharding(None, {"self": layout}, patch=patch, partial=operation)


def _padded_with_identity(builder, tensor, token_dim: int, dims: list[int], ndim: int, operation: str, dtype):
    """`tensor` reduced over every listed dim but the token axis (keeping them), with one more token holding
    the identity of `operation` appended: the same max or min, and never empty."""
    others = [d for d in dims if d != token_dim]
    if others:
        tensor = builder.call(aten.amax.default if operation == "max" else aten.amin.default, tensor, others, True)
    if dtype.is_floating_point:
        identity = float("-inf") if operation == "max" else float("inf")
    else:
        identity = torch.iinfo(dtype).min if operation == "max" else torch.iinfo(dtype).max
    padding = [0, 0] * (ndim - 1 - token_dim) + [0, 1]
    return builder.call(aten.constant_pad_nd.default, tensor, padding, identity)


# `max.other` and `min.other` (torch.max(a, b)) are elementwise, not reductions: the overloads of the two
# packets above that take a second tensor (a per-token activation scale's clamp at zero, in torchao's
# decomposed choose_qparams_affine).
rule(aten.max.other, aten.min.other,
     declines_when="its inputs carry the token axis on dims that do not line up")(pointwise)


_CONTRACTION = ("it contracts over the token axis of one operand only, or both operands are sharded along "
                "dims it does not contract")


def contraction_over_tokens(left: Layout, right: Layout, left_ndim: int, right_ndim: int, names) -> Optional[Sharding]:
    """A matrix product that contracts over the token axis of both operands, split alike (linear attention's
    K^T V): each rank multiplies its shards, a partial sum of the full product, which one all-reduce of the
    small result completes (no gather of the sequence)."""
    if (left is not None and right is not None and left_ndim >= 2 and right_ndim >= 2
            and left.dim == left_ndim - 1 and right.dim == right_ndim - 2 and left.same_split(right)):
        return Sharding(None, {names[0]: left, names[1]: right}, partial="sum")
    return None


@rule(aten.matmul, declines_when=_CONTRACTION)
def matmul(view: OpView) -> Optional[Sharding]:
    left, right = view.layout("self"), view.layout("other")
    left_ndim, right_ndim = len(view.shape(view["self"])), len(view.shape(view["other"]))
    out_ndim = len(view.out_shape)
    if left is not None and right is None and left_ndim >= 2 and left.dim < left_ndim - 1:
        return Sharding(left.at_dim(left.dim + out_ndim - left_ndim), {"self": left})
    if right is not None and left is None and right_ndim >= 2 and right.dim == right_ndim - 1:
        return Sharding(right.at_dim(out_ndim - 1), {"other": right})
    return contraction_over_tokens(left, right, left_ndim, right_ndim, ("self", "other"))


@rule(aten.mm, aten.bmm, aten._int_mm, declines_when=_CONTRACTION)
def matrix_product(view: OpView) -> Optional[Sharding]:
    left, right = view.layout("self"), view.layout("mat2")
    ndim = len(view.out_shape)
    if left is not None and right is None and left.dim < ndim - 1:
        return Sharding(left, {"self": left})
    if right is not None and left is None and right.dim == ndim - 1:
        return Sharding(right, {"mat2": right})
    return contraction_over_tokens(left, right, ndim, ndim, ("self", "mat2"))


@rule(aten._scaled_mm, declines_when="its left operand is not split along its rows, or a scale does not follow it")
def scaled_matrix_product(view: OpView) -> Optional[Sharding]:
    """A float8 matrix product (torchao's float8 linear): rows of the left operand are tokens. Its scale is
    per tensor (one element, replicated: a per-tensor activation scale is computed over every rank's tokens,
    see `_partial_reduction`) or per row (one per token, split like the rows); the right operand's scale and
    the bias belong to the weight."""
    left = view.layout("self")
    if left is None or left.dim != 0 or any(view.layout(name) is not None for name in ("mat2", "scale_b", "bias")):
        return None
    inputs = {"self": left}
    scale, scale_shape = view.layout("scale_a"), view.shape(view["scale_a"])
    if scale is not None and (scale.dim != 0 or not scale.same_split(left)):
        return None
    if scale is not None or (not same_size(product(scale_shape), 1) and same_size(scale_shape[0], left.length)):
        inputs["scale_a"] = left  # per row: a scale held whole is cut like the rows
    elif not same_size(product(scale_shape), 1):
        return None
    return Sharding(left, inputs)


def _einsum_subscripts(equation: str) -> Optional[tuple[list[str], str]]:
    """The operands' and the output's subscripts of an explicit einsum equation, or None for one with an
    ellipsis or an implicit output (neither is worth following here)."""
    equation = equation.replace(" ", "")
    if "->" not in equation or "." in equation:
        return None
    inputs, output = equation.split("->")
    return inputs.split(","), output


@rule(aten.einsum, declines_when="it repeats the token axis' subscript")
def einsum(view: OpView) -> Optional[Sharding]:
    """The token axis is the subscript the first split operand has it under: every operand that has that
    subscript (at a size other than 1) is used split alike there, the others whole (an operand split along
    another subscript is re-split or gathered, as a pointwise op's would be). Kept in the output, the output
    is split at its place (DiT's "nhwpqc->nchpwq" unpatchify with the tokens in n); summed over, each rank's
    product is a partial sum, all-reduced."""
    parsed = _einsum_subscripts(view["equation"])
    operands = view["tensors"]
    layouts = _list_layouts(view, "tensors")
    if parsed is None or len(parsed[0]) != len(operands):
        return None
    subscripts, output = parsed
    sharded = [(letters, layout) for letters, layout in zip(subscripts, layouts) if layout is not None]
    if not sharded:
        return None
    letter, reference = sharded[0][0][sharded[0][1].dim], sharded[0][1]
    required: list[Layout] = []
    for letters, operand in zip(subscripts, operands):
        if letters.count(letter) > 1:
            return None
        position = letters.find(letter)
        broadcast = position < 0 or same_size(view.shape(operand)[position], 1)
        required.append(None if broadcast else reference.at_dim(position))
    if output.count(letter) > 1:
        return None
    if letter in output:
        return Sharding(reference.at_dim(output.index(letter)), {"tensors": required})
    return Sharding(None, {"tensors": required}, partial="sum")


@rule(aten.pad, aten.constant_pad_nd, declines_when="it pads the token axis in another mode than constant, or crops it")
def pad(view: OpView) -> Optional[Sharding]:
    """Padding of other dims keeps the token axis whole; `pad` lists (before, after) pairs from the last dim.
    Constant padding of the token axis adds a segment of padding before or after the others, split over the
    ranks like any segment: each rank pads its shard by its share of it (Mochi pads each sample's attention
    output from its valid text tokens back to the full text length)."""
    layout = view.layout("self")
    if layout is None:
        return None
    ndim, amounts = len(view.shape(view["self"])), list(view["pad"])
    pair = ndim - 1 - layout.dim
    if 2 * pair + 1 >= len(amounts) or (same_size(amounts[2 * pair], 0) and same_size(amounts[2 * pair + 1], 0)):
        return Sharding(layout, {"self": layout})
    before, after = amounts[2 * pair], amounts[2 * pair + 1]
    if view.args.get("mode", "constant") != "constant" or not all(known_nonnegative(a) for a in (before, after)):
        return None
    added = [(index, amount) for index, amount in ((0, before), (1, after)) if not same_size(amount, 0)]
    segments = ((before,) if not same_size(before, 0) else ()) + layout.segments + (
        (after,) if not same_size(after, 0) else ())

    def patch(builder, args, local):
        local_amounts = list(args["pad"])
        for index, amount in added:
            local_amounts[2 * pair + index] = local.share_of(amount)
        return {**args, "pad": local_amounts}

    return Sharding(TokenLayout(layout.dim, segments), {"self": layout}, patch)


@rule(aten.addmm, declines_when="it contracts over the token axis")
def addmm(view: OpView) -> Optional[Sharding]:
    left = view.layout("mat1")
    if left is None or left.dim != 0 or view.layout("mat2") is not None:
        return None
    bias_shape = view.shape(view["self"])
    inputs = {"mat1": left}
    if len(bias_shape) == 2 and not same_size(bias_shape[0], 1):
        inputs["self"] = left
    return Sharding(left, inputs)


@rule(aten.outer, declines_when="both operands are sharded")
def outer(view: OpView) -> Optional[Sharding]:
    left, right = view.layout("self"), view.layout("vec2")
    if left is not None and right is None:
        return Sharding(left, {"self": left})
    if right is not None and left is None:
        return Sharding(right.at_dim(1), {"vec2": right})
    return None


@rule(aten.embedding, declines_when="the embedding table is sharded")
def embedding(view: OpView) -> Optional[Sharding]:
    layout = view.layout("indices")
    if layout is None or view.layout("weight") is not None:
        return None
    return Sharding(layout, {"indices": layout})


@keeps_token_axis(aten.index_select, declines_when="it indexes along the token axis")
def index_select(view: OpView, layout: TokenLayout) -> Optional[int]:
    along = normalize_dim(view["dim"], len(view.shape(view["self"])))
    return layout.dim if layout.dim != along and view.layout("index") is None else None


@keeps_token_axis(aten.repeat_interleave, declines_when="it repeats along the token axis")
def repeat_interleave(view: OpView, layout: TokenLayout) -> Optional[int]:
    if view.node.target is not aten.repeat_interleave.self_int or view["dim"] is None:
        return None
    along = normalize_dim(view["dim"], len(view.shape(view["self"])))
    return layout.dim if layout.dim != along else None


@keeps_token_axis(aten.flip, aten.roll, declines_when="it works along the token axis")
def along_listed_dims(view: OpView, layout: TokenLayout) -> Optional[int]:
    ndim = len(view.shape(view["self"]))
    dims = view.args.get("dims")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if not dims or layout.dim in [normalize_dim(d, ndim) for d in dims]:
        return None
    return layout.dim


# ----------------------------------------------------------------------------------------------------
# Shape ops. Sizes in their arguments are global; the patches put the local token count in its place.

def _matching_dim(in_shape, in_dim, out_shape) -> Optional[int]:
    """The output dim that holds exactly the input's dim `in_dim` under a row-major reshape: same size,
    same product of the dims in front. None when the reshape splits or merges the token axis."""
    prefix = product(in_shape[:in_dim])
    running: Size = 1
    for out_dim, size in enumerate(out_shape):
        if same_size(running, prefix) and same_size(size, in_shape[in_dim]):
            return out_dim
        running = running * size
    return None


@rule(aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten._reshape_alias,
      declines_when="it splits or merges the token axis with other dims (an unpatchify, say)")
def reshape(view: OpView) -> Optional[Sharding]:
    layout = view.layout("self")
    if layout is None:
        return None
    in_shape, out_shape = view.shape(view["self"]), view.out_shape
    out_dim = _matching_dim(in_shape, layout.dim, out_shape)
    if out_dim is None:
        return None

    def patch(builder, args, local):
        sizes = [builder.size(s) for s in out_shape]
        sizes[out_dim] = local.length
        return {"__target__": aten.reshape.default, "self": args["self"], "shape": sizes}

    return Sharding(layout.at_dim(out_dim), {"self": layout}, patch)


@rule(aten.expand)
def expand(view: OpView) -> Optional[Sharding]:
    layout = view.layout("self")
    if layout is None:
        return None
    out_dim = layout.dim + len(view["size"]) - len(view.shape(view["self"]))

    def patch(builder, args, local):
        sizes = list(args["size"])
        sizes[out_dim] = -1
        return {**args, "size": sizes}

    return Sharding(layout.at_dim(out_dim), {"self": layout}, patch)


@keeps_token_axis(aten.repeat, declines_when="it repeats along the token axis")
def repeat(view: OpView, layout: TokenLayout) -> Optional[int]:
    repeats = view["repeats"]
    out_dim = layout.dim + len(repeats) - len(view.shape(view["self"]))
    return out_dim if isinstance(repeats[out_dim], int) and repeats[out_dim] == 1 else None


@keeps_token_axis(aten.permute, declines_when="never")
def permute(view: OpView, layout: TokenLayout) -> Optional[int]:
    ndim = len(view.out_shape)
    return [normalize_dim(d, ndim) for d in view["dims"]].index(layout.dim)


@keeps_token_axis(aten.transpose, aten.swapaxes, aten.swapdims, declines_when="never")
def transpose(view: OpView, layout: TokenLayout) -> Optional[int]:
    ndim = len(view.out_shape)
    first = normalize_dim(view.args.get("dim0", view.args.get("axis0")), ndim)
    second = normalize_dim(view.args.get("dim1", view.args.get("axis1")), ndim)
    return {first: second, second: first}.get(layout.dim, layout.dim)


@keeps_token_axis(aten.t, declines_when="never")
def transpose_2d(view: OpView, layout: TokenLayout) -> Optional[int]:
    return 1 - layout.dim if len(view.out_shape) == 2 else layout.dim


@keeps_token_axis(aten.movedim, declines_when="never")
def movedim(view: OpView, layout: TokenLayout) -> Optional[int]:
    ndim = len(view.out_shape)
    sources = view["source"] if isinstance(view["source"], (list, tuple)) else [view["source"]]
    targets = view["destination"] if isinstance(view["destination"], (list, tuple)) else [view["destination"]]
    sources = [normalize_dim(d, ndim) for d in sources]
    order: list = [None] * ndim
    for source, target in zip(sources, targets):
        order[normalize_dim(target, ndim)] = source
    rest = iter(d for d in range(ndim) if d not in sources)
    order = [d if d is not None else next(rest) for d in order]
    return order.index(layout.dim)


@keeps_token_axis(aten.unsqueeze, declines_when="never")
def unsqueeze(view: OpView, layout: TokenLayout) -> Optional[int]:
    dim = normalize_dim(view["dim"], len(view.out_shape))
    return layout.dim + (1 if dim <= layout.dim else 0)


@rule(aten.squeeze, declines_when="it squeezes the token axis")
def squeeze(view: OpView) -> Optional[Sharding]:
    layout = view.layout("self")
    if layout is None:
        return None
    shape = view.shape(view["self"])
    ndim = len(shape)
    dims = view.args.get("dim", view.args.get("dims"))
    if dims is None:
        dims = [d for d, size in enumerate(shape) if same_size(size, 1)]
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = [normalize_dim(d, ndim) for d in dims if same_size(shape[normalize_dim(d, ndim)], 1)]
    if layout.dim in dims:
        return None

    def patch(builder, args, local):
        # A rank may hold one token: an implicit squeeze would drop its token axis, so name the dims.
        return {"__target__": aten.squeeze.dims, "self": args["self"], "dim": dims}

    return Sharding(layout.at_dim(layout.dim - sum(1 for d in dims if d < layout.dim)), {"self": layout}, patch)


@keeps_token_axis(aten.select, declines_when="it picks single tokens")
def select(view: OpView, layout: TokenLayout) -> Optional[int]:
    dim = normalize_dim(view["dim"], len(view.shape(view["self"])))
    if dim == layout.dim:
        return None
    return layout.dim - (1 if dim < layout.dim else 0)


def _segment_range(layout: TokenLayout, start: Size, end: Size) -> Optional[tuple[int, int]]:
    """Indices [first, last) of the segments that exactly cover global tokens [start, end), if any."""
    boundaries: list[Size] = [0]
    for segment in layout.segments:
        boundaries.append(boundaries[-1] + segment)
    first = next((i for i, b in enumerate(boundaries) if same_size(b, start)), None)
    last = next((i for i, b in enumerate(boundaries) if same_size(b, end)), None)
    if first is None or last is None or last <= first:
        return None
    return first, last


def _normalized_bounds(start, end, length) -> tuple[Size, Size]:
    start = 0 if start is None else start
    end = length if end is None else end
    if isinstance(start, int) and start < 0:
        start = start + length
    if isinstance(end, int) and end < 0:
        end = end + length
    if isinstance(end, int) and isinstance(length, int):
        end = min(end, length)
    elif isinstance(end, int) and end >= 2**62:
        end = length
    return start, end


def _slice_along(view: OpView, layout: TokenLayout, dim: int, start, end, step) -> Optional[Sharding]:
    if dim != layout.dim:
        return Sharding(layout, {"self": layout})
    if step != 1:
        return None
    start, end = _normalized_bounds(start, end, layout.length)
    found = _segment_range(layout, start, end)
    if found is None:
        return None
    first, last = found

    def patch(builder, args, local):
        return {"__target__": aten.slice.Tensor, "self": args["self"], "dim": dim,
                "start": local.segment_offsets()[first], "end": local.segment_ends()[last - 1], "step": 1}

    return Sharding(TokenLayout(dim, layout.segments[first:last]), {"self": layout}, patch)


@rule(aten.slice, declines_when="it slices the token axis away from segment boundaries")
def slice_tokens(view: OpView) -> Optional[Sharding]:
    layout = view.layout("self")
    if layout is None:
        return None
    dim = normalize_dim(view["dim"], len(view.shape(view["self"])))
    return _slice_along(view, layout, dim, view["start"], view["end"], view["step"])


@rule(aten.narrow, declines_when="it slices the token axis away from segment boundaries")
def narrow(view: OpView) -> Optional[Sharding]:
    layout = view.layout("self")
    if layout is None:
        return None
    dim = normalize_dim(view["dim"], len(view.shape(view["self"])))
    return _slice_along(view, layout, dim, view["start"], view["start"] + view["length"], 1)


@rule(aten.split, aten.split_with_sizes, aten.chunk, aten.tensor_split, aten.unsafe_split,
      aten.split_with_sizes_copy, declines_when="it splits the token axis away from segment boundaries")
def split(view: OpView) -> Optional[Sharding]:
    layout = view.layout("self")
    if layout is None:
        return None
    ndim = len(view.shape(view["self"]))
    dim = normalize_dim(view.args.get("dim", 0), ndim)
    outputs = view.node.meta["val"]
    if dim != layout.dim:
        return Sharding([layout] * len(outputs), {"self": layout})
    # Along the token axis: fine when every piece is a run of whole segments.
    pieces, start = [], 0
    for output in outputs:
        end = start + output.shape[dim]
        found = _segment_range(layout, start, end)
        if found is None:
            return None
        pieces.append(found)
        start = end

    def patch(builder, args, local):
        lengths = local.segment_lengths()
        sizes = [builder.total(lengths[first:last]) for first, last in pieces]
        return {"__target__": aten.split_with_sizes.default, "self": args["self"], "split_sizes": sizes, "dim": dim}

    return Sharding([TokenLayout(dim, layout.segments[a:b]) for a, b in pieces], {"self": layout}, patch)


@rule(aten.unbind, declines_when="it unbinds the token axis")
def unbind(view: OpView) -> Optional[Sharding]:
    layout = view.layout("self")
    if layout is None:
        return None
    dim = normalize_dim(view["dim"], len(view.shape(view["self"])))
    if dim == layout.dim:
        return None
    count = len(view.node.meta["val"])
    return Sharding([layout.at_dim(layout.dim - (1 if dim < layout.dim else 0))] * count, {"self": layout})


def _list_layouts(view: OpView, name: str) -> list[Layout]:
    return [view.layout_of(t) if isinstance(t, fx.Node) else None for t in view[name]]


@rule(aten.cat, aten.concat, aten.concatenate)
def cat(view: OpView) -> Optional[Sharding]:
    tensors = view["tensors"]
    layouts = _list_layouts(view, "tensors")
    if all(layout is None for layout in layouts):
        return None
    out_ndim = len(view.out_shape)
    dim = normalize_dim(view["dim"], out_ndim)
    # Legacy empty 1-D tensors are skipped by cat; keep them out of the layout.
    real = [t for t in tensors if len(view.shape(t)) == out_ndim]
    if any(layout is not None and layout.dim == dim for layout in layouts):
        # Along the token axis: the local cat appends segments.
        required, segments = [], []
        for tensor, layout in zip(tensors, layouts):
            if tensor not in real:
                required.append(None)
                continue
            if layout is None or layout.dim != dim:
                layout = TokenLayout(dim, (view.shape(tensor)[dim],))
            required.append(layout)
            segments.extend(layout.segments)
        return Sharding(TokenLayout(dim, tuple(segments)), {"tensors": required})
    reference = next(layout for layout in layouts if layout is not None)
    required = [reference if t in real and not same_size(view.shape(t)[reference.dim], 1) else None
                for t in tensors]
    return Sharding(reference, {"tensors": required})


@rule(aten.stack)
def stack(view: OpView) -> Optional[Sharding]:
    layouts = _list_layouts(view, "tensors")
    reference = next((layout for layout in layouts if layout is not None), None)
    if reference is None:
        return None
    dim = normalize_dim(view["dim"], len(view.out_shape))
    out_dim = reference.dim + (1 if dim <= reference.dim else 0)
    return Sharding(reference.at_dim(out_dim), {"tensors": [reference] * len(layouts)})


@rule(aten.pad_sequence, declines_when="its sequences differ in length along the token axis, or are split unlike")
def pad_sequence(view: OpView) -> Optional[Sharding]:
    """Stacks the sequences into a new batch dim (0 with batch_first, else 1), padding their first dims to the
    longest. Padding never touches a token axis that the sequences share at the same length, so it follows the
    token axis like `stack` when every sequence is split alike and, where the token axis is the padded dim,
    they all have the same length (Z-Image stacks each sample's caption and image tokens this way)."""
    sequences = view["sequences"]
    layouts = _list_layouts(view, "sequences")
    reference = next((layout for layout in layouts if layout is not None), None)
    if reference is None or any(layout is not None and layout != reference for layout in layouts):
        return None
    shapes = [view.shape(sequence) for sequence in sequences]
    if reference.dim == 0 and not all(same_size(shape[0], reference.length) for shape in shapes):
        return None
    out_dim = reference.dim + 1 if reference.dim > 0 or view["batch_first"] else 0
    return Sharding(reference.at_dim(out_dim), {"sequences": [reference] * len(layouts)})


# ----------------------------------------------------------------------------------------------------
# Facts beyond the rules

# Ops that never run on shards: listed so the explanation can say so plainly rather than "unknown op".
classify(aten.scaled_dot_product_attention, mixes_tokens="attention mixes tokens (handled by the attention rewrite)")
classify(aten.convolution, aten.conv1d, aten.conv2d, aten.conv3d, mixes_tokens="a convolution mixes neighbouring tokens")
classify(aten.index, mixes_tokens="advanced indexing may pick any token")
classify(aten.gather, mixes_tokens="gather may pick any token")

# What attention becomes in a rewritten graph: SDPA (Ulysses, local or replicated), the kernels ring attention
# calls per step, or the log-sum-exp of ring attention's exact fp32 path.
classify(aten.scaled_dot_product_attention.default, aten._scaled_dot_product_flash_attention.default,
         aten._scaled_dot_product_flash_attention_for_cpu.default, aten._scaled_dot_product_efficient_attention.default,
         aten._scaled_dot_product_cudnn_attention.default, aten.logsumexp.default, attention_kernel=True)

# Ops a residual stream passes through unchanged in value (up to dtype) and shape: following them back from
# a block's output reaches the block's input (First Block Cache).
classify(aten.clone.default, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
         aten.type_as.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
         aten.clamp.default, aten.clip.default, aten.view.default, aten.reshape.default, residual_passthrough=True)

# Pure size arithmetic: keeps its global meaning on shards, and First Block Cache recomputes it in every part
# that needs it instead of passing it between parts.
classify(aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int, size_query=True)
