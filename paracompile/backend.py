"""The `paracompile` torch.compile backend.

Invariant: the callable returned for Dynamo's graph, called on every rank with the same full inputs,
returns what the graph returns (to Inductor's accuracy), or raises the same error on every rank.

torch calls `paracompile_backend(graph_module, example_inputs, options=...)` with Dynamo's graph. Each call
makes one CompileContext (context.py: the options, the mesh plan, the report) and passes it down the
pipeline; the callable it returns carries it as `paracompile_context`. One process: plain Inductor (with
First Block Cache or CUDA graphs if asked). Several ranks, one linear pipeline:
  parse_options -> resolve_mesh (degrees checked, groups made) -> trace_to_aten -> merge_common_subexpressions
  (a value computed twice costs one collective, not two) -> resolve_auto ("auto"
  needs the graph's head counts) -> shard_batch -> shard_tokens (sharding_plan.plan_sharding: a layout per node,
  the cuts, an attention strategy per attention node; then one rewrite that applies the plan)
  -> compile_graph (First Block Cache's split, compile once per block if asked, Inductor with the overlap
  patches, CUDA graphs) -> guarded
  (the ranks' input check, forward only).
Passes take what they need as arguments and never import this module; the only state kept here is the
bounded registry of every compile's reports and rewritten graphs, for users (`explanations()`).
"""
from __future__ import annotations

import dataclasses
import warnings
from collections import deque
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from paracompile.context import CompileContext, with_context
from paracompile.explain import Report, describe_added_ops
from paracompile.mesh import resolve_auto, resolve_mesh
from paracompile.meta import attention_kind
from paracompile.options import Options, inductor_patches, parse_options
from paracompile.passes.common_subexpressions import merge_common_subexpressions
from paracompile.passes.compile_blocks import compile_by_block
from paracompile.passes.first_block_cache import compile_with_first_block_cache
from paracompile.passes.shard_batch import shard_batch
from paracompile.passes.shard_tokens import shard_tokens
from paracompile.passes.sharding_plan import attention_nodes, self_attention_head_counts
from paracompile.passes.subclass_inputs import flatten_subclasses, has_subclasses
from paracompile.passes.trace_to_aten import aten_graph_with_values, trace_to_aten
from paracompile.passes.ulysses_attention import SequenceAttention
from paracompile.runtime import InputCheck, guarded, model_state_positions, trainable

# The most recent explain texts and rewritten graphs of every compile, newest last, bounded: each compile's
# context feeds them as it makes them (README, "Reading explain"). A compile's own are on its context.
explanations: deque = deque(maxlen=32)
rewritten_graphs: deque = deque(maxlen=8)


def recent_explanations() -> list[str]:
    """The explain texts of the most recent compiles (at most 32), oldest first: each rewrite's report, and
    First Block Cache's and compile_blocks' lines. `paracompile.explanations()`."""
    return list(explanations)


def paracompile_backend(gm: fx.GraphModule, example_inputs: list, options: Optional[dict] = None) -> Callable:
    parsed = parse_options(options)
    context = CompileContext(parsed, resolve_mesh(parsed.mesh), on_record=explanations.append,
                             on_rewritten=rewritten_graphs.append)
    if context.mesh.world_size == 1 and parsed.threshold == 0 and not parsed.cuda_graphs and not parsed.compile_blocks:
        return with_context(compile_graph(gm, example_inputs, context), context)  # plain Inductor: exact gradients
    if has_subclasses(example_inputs):
        # A tensor-subclass input (a torchao quantized weight) is traced as its inner tensors, so the passes
        # and compilers below see plain tensors only (passes/subclass_inputs.py); each call's subclass
        # arguments are flattened the same way.
        compiled = compile_traced(trace_to_aten(gm, example_inputs), flatten_subclasses(example_inputs)[0], context)
        return with_context(lambda *args: compiled(*flatten_subclasses(args)[0]), context)
    return with_context(compile_traced(gm, example_inputs, context), context)


def compile_traced(gm: fx.GraphModule, example_inputs: list, context: CompileContext) -> Callable:
    """The backend past plain Inductor, for Dynamo's graph or its aten trace (trace_to_aten)."""
    parsed = context.options
    if context.mesh.world_size == 1:
        with torch.no_grad():
            compiled = compile_graph(gm, example_inputs, context)
        return guarded(compiled, _NO_BACKWARD_WITH_CACHE if parsed.threshold > 0 else
                       _NO_BACKWARD_WITH_GRAPHS if parsed.cuda_graphs else _NO_BACKWARD_BY_BLOCK)

    aten_graph = aten_graph_with_values(gm, example_inputs, keep_guards=True)
    merged = merge_common_subexpressions(aten_graph)
    if merged:
        context.report.notes.append(f"{merged} repeated computations merged before the plan (e.g. one float8 "
                                    "scale for the projections of one activation; passes/common_subexpressions.py)")
    check = InputCheck([node.target for node in aten_graph.graph.nodes if node.op == "placeholder"],
                       example_inputs, parsed.check_inputs)
    training = torch.is_grad_enabled() and any(
        isinstance(value, torch.Tensor) and value.requires_grad for value in example_inputs)
    if not attention_nodes(aten_graph.graph):
        warnings.warn("paracompile: the graph has no scaled_dot_product_attention; nothing to parallelise, "
                      "compiling it replicated on every rank", stacklevel=2)
        untrainable = untrainable_because(None, parsed) if training else None
        if training and untrainable is None:  # replicated everywhere: the same convention, no collective
            scale_output_grads(aten_graph, aten_graph, 1.0 / context.mesh.world_size)
            return trainable(compile_graph(aten_graph, example_inputs, context), check)
        with torch.no_grad():
            return guarded(compile_graph(aten_graph, example_inputs, context), _no_backward(untrainable), check)

    context.mesh = resolve_auto(context.mesh, self_attention_head_counts(aten_graph.graph))
    untrainable = untrainable_because(context.mesh, parsed) if training else None
    no_backward = _no_backward(untrainable)
    trains = training and untrainable is None
    if trains:
        context.mesh = differentiable_plan(context.mesh)
    sharded = rewrite(aten_graph, context)
    if trains:
        scale_output_grads(sharded, aten_graph, 1.0 / context.mesh.world_size)
        context.report.notes.append(
            f"compiled to train: collectives with a backward, output gradients divided by "
            f"{context.mesh.world_size} and input gradients summed over the ranks (differentiable.py)")
    elif training:
        context.report.notes.append(f"forward only ({untrainable}): backward raises")
    if parsed.compiler == "inductor":
        context.report.notes.append(describe_overlap(attention_kinds(sharded), parsed))
    context.record(context.report.format())
    context.keep_rewritten(sharded)
    if trains:
        return trainable(compile_graph(sharded, example_inputs, context), check)
    # Compiled for inference: the graph runs without autograd history (see runtime.guarded).
    with torch.no_grad():
        return guarded(compile_graph(sharded, example_inputs, context), no_backward, check)


def rewrite(aten_graph: fx.GraphModule, context: CompileContext) -> fx.GraphModule:
    """The graph split over the mesh: its batch dim (shard_batch), then its tokens (shard_tokens), with what
    each did in the context's report."""
    plan, report = context.mesh, context.report
    report.world = plan.describe()
    sharded = aten_graph
    if plan.batch is not None:
        batch_report = Report()
        sharded = shard_batch(sharded, plan.batch, batch_report)
        report.slices += [f"batch: {line}" for line in batch_report.slices]
        report.gathers += [f"batch: {line}" for line in batch_report.gathers]
        report.reductions += [f"batch: {line}" for line in batch_report.reductions]
    if plan.sequence is not None:
        strategy = SequenceAttention(plan, ulysses_chunks=context.options.ulysses_chunks)
        sharded = shard_tokens(sharded, plan.sequence, report, strategy, mesh=plan)
        sharded.graph.eliminate_dead_code()
        sharded.graph.lint()
        sharded.recompile()
    elif plan.batch is not None:
        report.attention += batch_report.attention
    if plan.ring is not None or plan.batch is not None:
        report.notes.append(f"process groups: {plan.describe_groups()}")
    report.notes.append(describe_added_ops(aten_graph.graph, sharded.graph))
    return sharded


def untrainable_because(plan, options: Options) -> Optional[str]:
    """Why a graph compiled with grad mode on cannot have exact gradients (None: it can); such a graph runs
    forward-only and its backward raises with this reason. `plan` None: the graph has no attention. (Ring
    meshes train with ring attention in a differentiable op: ring_kernels.py.)"""
    if options.threshold > 0:
        return "First Block Cache (threshold > 0) reuses residuals of earlier calls; set threshold to 0 to train"
    if options.cuda_graphs:
        return "the CUDA graphs replay the forward only; turn cuda_graphs off to train"
    if options.compile_blocks:
        return "compile_blocks compiles the blocks for inference; turn it off to train"
    return None


def differentiable_plan(plan):
    """The mesh plan with every group emitting collectives that have a backward (differentiable.py)."""
    groups = {name: dataclasses.replace(group, differentiable=True)
              for name in ("batch", "ring", "ulysses", "sequence")
              if (group := getattr(plan, name)) is not None}
    return dataclasses.replace(plan, **groups)


def scale_output_grads(gm: fx.GraphModule, original: fx.GraphModule, factor: float) -> None:
    """Every floating-point output of `gm` through `paracompile.scale_grad`: each rank holds the full gradient
    of the replicated output, and the backward convention wants a partial (differentiable.py). Which outputs
    are floating point, the original graph's values say (the rewrite's new nodes carry none)."""
    output = next(node for node in reversed(gm.graph.nodes) if node.op == "output")
    original_output = next(node for node in reversed(original.graph.nodes) if node.op == "output")
    examples = iter([node.meta.get("val") if isinstance(node, fx.Node) else node
                     for node in torch.utils._pytree.tree_leaves(original_output.args[0])])

    def scaled(value):
        example = next(examples)
        if not isinstance(value, fx.Node) or not isinstance(example, torch.Tensor) or not example.is_floating_point():
            return value
        with gm.graph.inserting_before(output):
            node = gm.graph.call_function(torch.ops.paracompile.scale_grad.default, (value, factor))
        node.meta["val"] = example
        return node

    leaves, spec = torch.utils._pytree.tree_flatten(output.args[0])
    output.args = (torch.utils._pytree.tree_unflatten([scaled(leaf) for leaf in leaves], spec),)
    gm.graph.lint()
    gm.recompile()


def _no_backward(reason: Optional[str]) -> str:
    return f"paracompile: backward through this graph is not supported yet: {reason or 'it was compiled without grad mode'}"


_NO_BACKWARD_WITH_GRAPHS = (
    "paracompile: backward through CUDA graphs (cuda_graphs=True or mode='reduce-overhead') is not supported: "
    "the graphs replay the forward only. Turn them off to train")
_NO_BACKWARD_BY_BLOCK = (
    "paracompile: backward through compile_blocks=True is not supported yet: the blocks are compiled for "
    "inference. Turn it off to train")
_NO_BACKWARD_WITH_CACHE = (
    "paracompile: backward through First Block Cache (threshold > 0) is not supported: a skipped step reuses "
    "residuals of an earlier call. Set threshold to 0 to train")


def compile_graph(gm: fx.GraphModule, example_inputs: list, context: CompileContext,
                  name: str = "the graph") -> Callable:
    options = context.options
    if options.threshold > 0:
        # First Block Cache: splits the graph around the block loop and compiles each part through this
        # function again, with threshold 0 (passes/first_block_cache.py).
        return compile_with_first_block_cache(gm, example_inputs, context, compile_graph)
    compiled = compile_each_block_once(gm, example_inputs, context) if options.compile_blocks else None
    if compiled is None:
        compiled = compile_whole(gm, example_inputs, options)
    if options.cuda_graphs:
        return with_cuda_graphs(compiled, gm, example_inputs, name)
    return compiled


def compile_whole(gm: fx.GraphModule, example_inputs: list, options: Options) -> Callable:
    if options.compiler == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    from paracompile.differentiable import show_inductor_functional_collectives

    show_inductor_functional_collectives()
    return compile_fx(gm, example_inputs, config_patches=inductor_config(attention_kinds(gm), options))


def compile_each_block_once(gm: fx.GraphModule, example_inputs: list, context: CompileContext) -> Optional[Callable]:
    """`gm` cut into its blocks and the glue between them, each distinct part compiled once
    (passes/compile_blocks.py); None when the graph has no block loop (then it is compiled whole)."""
    options = context.options
    gm = aten_graph_with_values(gm, example_inputs, keep_guards=options.compiler != "eager")
    return compile_by_block(gm, lambda part, examples, name: compile_whole(part, examples, options), context.record)


def overlap_patches(attention_kinds: set) -> dict[str, Any]:
    """Inductor config for a graph with these rewritten attentions (their `meta.ATTENTION_KIND`).

    Ring attention and chunked Ulysses issue each transfer before the attention it should overlap, but
    Inductor's scheduler may order independent kernels either way: `raise_comms` and `sink_waits` start
    every collective as early and wait for it as late as its data allow, which keeps that overlap.
    Ulysses' exchanges have no attention of their own to hide under, so `reorder_compute_for_overlap` also
    moves independent compute between an exchange and its wait, by Inductor's runtime estimates: in a FLUX
    single block, the MLP's projection runs while an exchange is in flight. Measured on 2x H200, FLUX.1-dev
    4 + 8 blocks: 2-3% faster per step (benchmarks/results/ulysses_overlap_*). These passes move compute
    only: Inductor's scheduler first chains the collectives in graph order (decide_global_ordering_of_comms),
    and the graph is the same on every rank, so ranks with uneven shards (other local shapes, other
    estimates) still issue the same collectives in the same order."""
    if attention_kinds & {"ulysses", "ulysses_chunked"}:
        return dict(reorder_for_compute_comm_overlap=True,
                    reorder_for_compute_comm_overlap_passes=["reorder_compute_for_overlap", "sink_waits",
                                                             "raise_comms"])
    if "ring" in attention_kinds:
        return dict(reorder_for_compute_comm_overlap=True,
                    reorder_for_compute_comm_overlap_passes=["sink_waits", "raise_comms"])
    return {}


def attention_kinds(gm: fx.GraphModule) -> set:
    return {attention_kind(node) for node in gm.graph.nodes}


def inductor_config(kinds: set, options: Options) -> dict[str, Any]:
    """The config patches a graph is compiled with: the overlap passes for its attentions, then the
    options' own (the mode's, the `inductor` dict), which win."""
    patches = overlap_patches(kinds)
    patches.update(inductor_patches(options))
    return patches


def describe_overlap(kinds: set, options: Options) -> str:
    """The explain line for the Inductor passes that schedule collectives against compute, read from the
    config the graph is compiled with."""
    config = inductor_config(kinds, options)
    if not config.get("reorder_for_compute_comm_overlap"):
        if overlap_patches(kinds):
            return "Inductor: compute/communication reordering turned off by the 'inductor' option"
        return "Inductor: no compute/communication reordering (no Ulysses or Ring exchange to overlap)"
    import torch._inductor.config as inductor_defaults

    passes = config.get("reorder_for_compute_comm_overlap_passes",
                        inductor_defaults.reorder_for_compute_comm_overlap_passes)
    names = [getattr(p, "__name__", str(p)) for p in passes]
    return f"Inductor: compute/communication reordering ({', '.join(names)}); collectives keep their graph order"


def with_cuda_graphs(compiled: Callable, gm: fx.GraphModule, example_inputs: list, name: str) -> Callable:
    """`compiled` replayed as CUDA graphs (paracompile/cuda_graphs.py), where its inputs live on CUDA."""
    from paracompile.cuda_graphs import CudaGraphStep

    tensors = [value for value in example_inputs if isinstance(value, torch.Tensor)]
    if not any(value.device.type == "cuda" for value in tensors):
        warnings.warn(f"paracompile: cuda_graphs is on, but {name} takes no CUDA tensors; it runs without CUDA "
                      "graphs", stacklevel=3)
        return compiled
    names = [node.target for node in gm.graph.nodes if node.op == "placeholder"]
    # The model's own state (parameters, buffers) is read in place; a graph checks it has not moved.
    return CudaGraphStep(compiled, set(model_state_positions(names, example_inputs)), name)
