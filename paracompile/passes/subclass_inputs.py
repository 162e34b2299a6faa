"""Tensor-subclass inputs (a torchao quantized weight) as the plain tensors they hold.

Invariant: `flatten_subclasses(values)` replaces every traceable wrapper subclass among `values` (a tensor
with `__tensor_flatten__`, like torchao's `Int8Tensor`), recursively, by its inner tensors (`qdata`,
`scale`), in `__tensor_flatten__`'s order; `Unflatten(values)` turns such a flat list back into `values`'
structure, rebuilding each subclass with `__tensor_unflatten__` around the tensors it is given. The flat
names follow the same order: `<placeholder>_<attribute>_` (`L_self_..._parameters_weight_qdata_`), so an
inner tensor of a weight is still recognised as model state (runtime.model_state_positions) and reads as
`self.....weight_qdata` in errors.

Why: Dynamo lifts a module's parameters into graph inputs, so a quantized weight reaches the backend as a
subclass instance around fake inner tensors. make_fx tracks only the tensors it is handed: the subclass's
`__torch_function__` / `__torch_dispatch__` runs its implementation (an int8 mm and a scale multiply) on
inner tensors no proxy tracks, so the trace bakes them in as constants, or fails mixing real and fake
tensors. trace_to_aten therefore traces a function of the inner tensors that rebuilds the subclass first,
as AOTAutograd does (torch/_functorch/_aot_autograd/subclass_utils.py): the graph records the subclass's
implementation as plain aten ops on plain placeholders, which the sharding passes and Inductor know, and
the backend flattens the subclass arguments of every call the same way.
"""
from __future__ import annotations

from typing import Sequence

from torch.utils._python_dispatch import is_traceable_wrapper_subclass


def flatten_subclasses(values: Sequence, names: Sequence[str] = ()) -> tuple[list, list[str]]:
    """`values` with every subclass replaced by its inner tensors, and their names (from `names`, the
    values' own; empty names when none are given)."""
    flat, flat_names = [], []
    for value, name in zip(values, list(names) + [""] * (len(values) - len(names))):
        if is_traceable_wrapper_subclass(value):
            attributes, _ = value.__tensor_flatten__()
            inner, inner_names = flatten_subclasses([getattr(value, a) for a in attributes],
                                                    [f"{str(name).rstrip('_')}_{a}_" for a in attributes])
            flat += inner
            flat_names += inner_names
        else:
            flat.append(value)
            flat_names.append(name)
    return flat, flat_names


def has_subclasses(values: Sequence) -> bool:
    return any(is_traceable_wrapper_subclass(value) for value in values)


class Unflatten:
    """Rebuilds `templates`' structure from a flat list: each subclass template becomes a new instance of
    its class, with the template's metadata (`__tensor_flatten__`'s context) and outer size and stride,
    around the flat tensors in its place."""

    def __init__(self, templates: Sequence):
        self.layouts = [_layout(value) for value in templates]

    def __call__(self, flat: Sequence) -> list:
        remaining = iter(flat)
        return [_rebuild(layout, remaining) for layout in self.layouts]


def _layout(value):
    if not is_traceable_wrapper_subclass(value):
        return None
    attributes, context = value.__tensor_flatten__()
    return (type(value), context, value.size(), value.stride(),
            [(a, _layout(getattr(value, a))) for a in attributes])


def _rebuild(layout, remaining):
    if layout is None:
        return next(remaining)
    cls, context, size, stride, inner = layout
    tensors = {attribute: _rebuild(inner_layout, remaining) for attribute, inner_layout in inner}
    return cls.__tensor_unflatten__(tensors, context, size, stride)
