"""Rewrites of an exported decoder graph into fewer nodes, the layout ONNX Runtime GenAI's model builder writes by
hand: the same numbers, less work per decoded token.

`fuse_decoder(model)` rewrites, in place:

- **packed projections**: MatMuls that read the same input with constant 2-D weights of one dtype (a layer's query,
  key and value projections; the MLP's gate and up projections) become one MatMul over the concatenated weights,
  then one Add of the concatenated biases (when every one of them adds a constant bias, unless all are zero), then
  a Split: one weight read and one kernel call instead of two or three;
- **skip RMS normalization**: a residual `Add` whose sum feeds an `RMSNormalization` becomes ONNX Runtime's
  `SkipSimplifiedLayerNormalization` (com.microsoft), which returns the normalized sum and the sum;
- **rotary embedding**: transformers' `q * cos + rotate_half(q) * sin` (two Slices, a Neg, a Concat, two Muls and an
  Add per query and per key) becomes one ONNX `RotaryEmbedding` (opset 23) fed the half-width cos and sin it was
  built from, when cos and sin are a (B, S, D/2) tensor concatenated with itself (M-RoPE's per-token tables);
- **grouped-query attention over the shared buffers**: per layer, the heads' Reshape and Transpose, the ScatterND
  writes of the new keys and values into the key/value buffers and the `Attention` node become ONNX Runtime's
  `GroupQueryAttention` (com.microsoft) on the (B, S, heads * D) projections, after one `RotaryEmbedding` (opset 23,
  fed M-RoPE's per-token tables, as GenAI does for Qwen2.5-VL) each for the queries and the keys: it writes the new
  keys and values into the past buffers in place when the host binds each buffer as both past and present (GenAI's
  past-present-share-buffer), and attends to the P + S filled positions only. The padding of the attention mask
  (B, T) becomes an additive bias (B, 1, S, P + S), computed once for all layers.

A pattern that does not match exactly is left as it is. Nodes left without a consumer are removed.
"""

from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

MS_DOMAIN = "com.microsoft"


class _Graph:
    """Index of a graph's producers, consumers and constant tensors, rebuilt after each rewrite."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.initializers = {tensor.name: tensor for tensor in graph.initializer}
        self.producers = {name: node for node in graph.node for name in node.output if name}
        self.consumers = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.outputs = {value.name for value in graph.output}
        self.shapes = {
            value.name: [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]
            for value in [*graph.value_info, *graph.input, *graph.output]
            if value.type.tensor_type.HasField("shape")
        }

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producers.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def producer(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producers.get(name)
        return node if node is not None and node.op_type == op_type else None


def _attribute(node: onnx.NodeProto, name: str, default=None):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _replace(
    graph: onnx.GraphProto, replacements: list[tuple[list[onnx.NodeProto], list[onnx.NodeProto], onnx.NodeProto]]
) -> None:
    """For each (removed, added, at) of `replacements`, puts `added` where `at` stands and drops `removed` (which
    may include `at`), in one pass: the graph's node list is rebuilt, so node objects read before go stale."""
    removed_ids = {id(node) for removed, _, _ in replacements for node in removed}
    added_at = {id(at): added for _, added, at in replacements}
    nodes = []
    for node in graph.node:
        nodes.extend(added_at.get(id(node), []))
        if id(node) not in removed_ids:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def pack_matmuls(model: onnx.ModelProto) -> int:
    """Packs the constant-weight MatMuls that share an input (see the module docstring); returns how many packed
    MatMuls it wrote."""
    index = _Graph(model.graph)
    groups = defaultdict(list)
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in index.initializers:
            if len(index.initializers[node.input[1]].dims) == 2:
                groups[node.input[0]].append(node)
    replacements = []
    for source, matmuls in groups.items():
        if len(matmuls) < 2:
            continue
        weights = [index.constant(node.input[1]) for node in matmuls]
        if len({(weight.shape[0], weight.dtype) for weight in weights}) != 1:
            continue
        widths = [weight.shape[1] for weight in weights]
        adds, biases = [], []
        for node, width in zip(matmuls, widths, strict=True):
            add = index.only_consumer(node.output[0])
            if add is None or add.op_type != "Add":
                break
            other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
            bias = index.constant(other)
            if bias is None or bias.shape != (width,):
                break
            adds.append(add)
            biases.append(bias)
        with_bias = len(adds) == len(matmuls)
        # An all-zero bias (a freshly initialised model's) adds nothing: its Adds go without a packed one.
        add_bias = with_bias and any(bias.any() for bias in biases)
        name = f"{matmuls[0].name}_packed"
        weight_name, packed_output = f"{name}.weight", f"{name}.output"
        model.graph.initializer.append(numpy_helper.from_array(np.concatenate(weights, axis=1), weight_name))
        split_name = f"{name}.split"
        model.graph.initializer.append(numpy_helper.from_array(np.array(widths, dtype=np.int64), split_name))
        added = [onnx.helper.make_node("MatMul", [source, weight_name], [packed_output], name=name)]
        if add_bias:
            bias_name, biased = f"{name}.bias", f"{name}.biased"
            model.graph.initializer.append(numpy_helper.from_array(np.concatenate(biases), bias_name))
            added.append(onnx.helper.make_node("Add", [packed_output, bias_name], [biased], name=f"{name}_bias"))
            packed_output = biased
        outputs = [node.output[0] for node in (adds if with_bias else matmuls)]
        added.append(
            onnx.helper.make_node("Split", [packed_output, split_name], outputs, name=f"{name}_split", axis=-1)
        )
        replacements.append(([*matmuls, *(adds if with_bias else [])], added, matmuls[0]))
    _replace(model.graph, replacements)
    _drop_unused(model.graph)
    return len(replacements)


def fuse_skip_rms_norm(model: onnx.ModelProto) -> int:
    """`Add(a, b)` → `RMSNormalization` (last axis, a 1-D scale) becomes `SkipSimplifiedLayerNormalization(a, b)`
    when `a` and `b` have the same known shape; returns how many it fused."""
    fused = 0
    for output in [node.output[0] for node in model.graph.node if node.op_type == "RMSNormalization"]:
        index = _Graph(model.graph)
        norm = index.producer(output, "RMSNormalization")
        add = None if norm is None else index.producer(norm.input[0], "Add")
        if add is None or _attribute(norm, "axis", -1) != -1 or len(norm.input) < 2:
            continue
        scale = index.constant(norm.input[1])
        first, second = (index.shapes.get(name) for name in add.input)
        if scale is None or scale.ndim != 1 or first is None or first != second or len(first) != 3:
            continue
        skip = onnx.helper.make_node(
            "SkipSimplifiedLayerNormalization",
            [add.input[0], add.input[1], norm.input[1]],
            [norm.output[0], "", "", add.output[0]],
            name=f"{norm.name}_skip",
            domain=MS_DOMAIN,
            epsilon=_attribute(norm, "epsilon", 1e-5),
        )
        _replace(model.graph, [([add, norm], [skip], add)])
        fused += 1
    if fused:
        _use_ms_domain(model)
    return fused


def _half_table(index: _Graph, name: str) -> str | None:
    """The (B, S, D/2) tensor H when `name` is `Unsqueeze(Concat(H, H, axis=-1), axes=[1])`, else None."""
    unsqueeze = index.producer(name, "Unsqueeze")
    if unsqueeze is None or len(unsqueeze.input) < 2:
        return None
    axes = index.constant(unsqueeze.input[1])
    concat = index.producer(unsqueeze.input[0], "Concat")
    if axes is None or axes.tolist() != [1] or concat is None or _attribute(concat, "axis") not in (-1, 2):
        return None
    if len(concat.input) != 2 or concat.input[0] != concat.input[1]:
        return None
    return concat.input[0]


def _slice_bounds(index: _Graph, node: onnx.NodeProto) -> tuple[int, int] | None:
    """(start, end) of a Slice on the last axis with step 1, else None."""
    if node.op_type != "Slice" or len(node.input) < 4:
        return None
    starts, ends, axes = (index.constant(name) for name in node.input[1:4])
    steps = index.constant(node.input[4]) if len(node.input) > 4 else np.array([1])
    if any(value is None or value.size != 1 for value in (starts, ends, axes, steps)):
        return None
    if int(axes.item()) not in (-1, 3) or int(steps.item()) != 1:
        return None
    return int(starts.item()), int(ends.item())


def _rotary_match(index: _Graph, add: onnx.NodeProto) -> tuple[list[onnx.NodeProto], str, str, str] | None:
    """The nodes of `x * cos + rotate_half(x) * sin` ending at `add`, x, and the half-width cos and sin."""
    for plain_name, rotated_name in (add.input, add.input[::-1]):
        plain, rotated = index.producer(plain_name, "Mul"), index.producer(rotated_name, "Mul")
        if plain is None or rotated is None:
            continue
        for x, cos in (plain.input, plain.input[::-1]):
            for turned, sin in (rotated.input, rotated.input[::-1]):
                concat = index.producer(turned, "Concat")
                if concat is None or len(concat.input) != 2 or _attribute(concat, "axis") not in (-1, 3):
                    continue
                neg, low = index.producer(concat.input[0], "Neg"), index.producers.get(concat.input[1])
                high = None if neg is None else index.producers.get(neg.input[0])
                if high is None or low is None or high.input[0] != x or low.input[0] != x:
                    continue
                low_bounds, high_bounds = _slice_bounds(index, low), _slice_bounds(index, high)
                if low_bounds is None or high_bounds is None:
                    continue
                half = low_bounds[1]
                shape = index.shapes.get(x)
                if low_bounds[0] != 0 or high_bounds[0] != half or high_bounds[1] < 2 * half:
                    continue
                if shape is None or len(shape) != 4 or shape[3] != 2 * half:
                    continue
                cos_half, sin_half = _half_table(index, cos), _half_table(index, sin)
                if cos_half is None or sin_half is None:
                    continue
                intermediates = [plain, rotated, concat, neg, low, high]
                if any(index.only_consumer(node.output[0]) is None for node in intermediates):
                    continue
                return intermediates, x, cos_half, sin_half
    return None


def _matches(model: onnx.ModelProto, op_type: str, matcher: Callable) -> Iterator[tuple[onnx.NodeProto, Any]]:
    """(node, match) for each `op_type` node that `matcher(index, node)` matches, each over a fresh index: the
    caller's rewrite of one match rebuilds the node list before the next is looked for."""
    for output in [node.output[0] for node in model.graph.node if node.op_type == op_type]:
        index = _Graph(model.graph)
        node = index.producer(output, op_type)
        match = None if node is None else matcher(index, node)
        if match is not None:
            yield node, match


def fuse_rotary(model: onnx.ModelProto) -> int:
    """Rewrites each rotate-half rotary embedding into an ONNX `RotaryEmbedding`; returns how many it fused."""
    fused = 0
    for add, match in _matches(model, "Add", _rotary_match):
        intermediates, x, cos_half, sin_half = match
        rotary = onnx.helper.make_node(
            "RotaryEmbedding", [x, cos_half, sin_half], [add.output[0]], name=f"{add.name}_rotary", interleaved=0
        )
        _replace(model.graph, [([*intermediates, add], [rotary], add)])
        fused += 1
    _drop_unused(model.graph)
    return fused


def _single_chain(index: _Graph, name: str, op_types: list[str]) -> list[onnx.NodeProto] | None:
    """The nodes producing `name` backwards through `op_types` (last first), each output used once, else None."""
    chain = []
    for op_type in op_types:
        node = index.producer(name, op_type)
        if node is None or (chain and index.only_consumer(node.output[0]) is None):
            return None
        chain.append(node)
        name = node.input[0]
    return chain


def _heads_input(index: _Graph, name: str) -> tuple[list[onnx.NodeProto], str] | None:
    """For `name` = Transpose(0, 2, 1, 3) of Reshape(x) to (B, S, heads, D): those nodes and x (B, S, heads * D)."""
    chain = _single_chain(index, name, ["Transpose", "Reshape"])
    if chain is None or list(_attribute(chain[0], "perm", [])) != [0, 2, 1, 3]:
        return None
    return chain, chain[1].input[0]


def _attention_match(index: _Graph, attention: onnx.NodeProto) -> dict | None:
    """The nodes around one `Attention` that `fuse_group_query_attention` replaces, and their inputs."""
    if len(attention.input) != 4 or attention.domain or len(attention.output) < 1:
        return None
    query, present_key, present_value, _ = attention.input
    transpose = index.only_consumer(attention.output[0])
    reshape = None if transpose is None else index.only_consumer(transpose.output[0])
    if transpose is None or reshape is None or transpose.op_type != "Transpose":
        return None
    if reshape.op_type != "Reshape" or list(_attribute(transpose, "perm", [])) != [0, 2, 1, 3]:
        return None
    found = {"remove": [attention, transpose, reshape], "output": reshape.output[0]}
    for role, name, rotary in (("query", query, True), ("key", present_key, True), ("value", present_value, False)):
        if role != "query":
            scatter = index.producer(name, "ScatterND")
            if (
                scatter is None
                or name not in index.outputs
                or scatter.input[0] not in {i.name for i in index.graph.input}
            ):
                return None
            found[f"past_{role}"], found[f"present_{role}"] = scatter.input[0], name
            update = scatter.input[2]
            expand = index.producer(update, "Expand")
            if expand is not None:
                if index.only_consumer(update) is None:
                    return None
                found["remove"].append(expand)
                update = expand.input[0]
            found["remove"].append(scatter)
            name = update
        if rotary:
            node = index.producer(name, "RotaryEmbedding")
            if node is None or len(node.input) != 3 or index.only_consumer(name) is None:
                return None
            if "cos" in found and (found["cos"], found["sin"]) != (node.input[1], node.input[2]):
                return None
            found["cos"], found["sin"] = node.input[1], node.input[2]
            found["remove"].append(node)
            name = node.input[0]
        if index.only_consumer(name) is None:
            return None
        heads = _heads_input(index, name)
        if heads is None:
            return None
        found["remove"].extend(heads[0])
        found[role] = heads[1]
        found[f"{role}_shape"] = index.shapes.get(name)
    query_shape, key_shape = found["query_shape"], found["key_shape"]
    if query_shape is None or key_shape is None:
        return None
    if not all(isinstance(value, int) for value in (query_shape[1], key_shape[1], query_shape[3])):
        return None
    found["num_heads"], found["kv_num_heads"], found["head_dim"] = query_shape[1], key_shape[1], query_shape[3]
    return found


def _attention_inputs(model: onnx.ModelProto, names: dict[str, str], dtype: int) -> tuple[list[onnx.NodeProto], dict]:
    """Nodes computing GroupQueryAttention's `seqlens_k` (B,) and `total_sequence_length` (int32, P + S) and the
    padding bias (B, 1, S, P + S) from the graph inputs `attention_mask` (B, T), `past_sequence_length` and
    `inputs_embeds` (B, S, H)."""
    prefix = "gqa_inputs"

    def constant(name: str, value: np.ndarray) -> str:
        model.graph.initializer.append(numpy_helper.from_array(value, f"{prefix}.{name}"))
        return f"{prefix}.{name}"

    zero, one = constant("zero", np.array([0], np.int64)), constant("one", np.array([1], np.int64))
    two, axis_one = constant("two", np.array([2], np.int64)), constant("axis_one", np.array([1], np.int64))
    float_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    blocked = constant("blocked", np.array(np.finfo(float_dtype).min, float_dtype))
    open_ = constant("open", np.array(0, float_dtype))
    make = onnx.helper.make_node
    out = {name: f"{prefix}/{name}" for name in ("seqlens_k", "total_sequence_length", "attention_bias")}
    nodes = [
        make("Shape", [names["inputs_embeds"]], [f"{prefix}/shape"]),
        make("Slice", [f"{prefix}/shape", one, two], [f"{prefix}/new"]),
        make("Shape", [names["inputs_embeds"]], [f"{prefix}/batch"], end=1),
        make("Reshape", [names["past_sequence_length"], one], [f"{prefix}/past"]),
        make("Add", [f"{prefix}/past", f"{prefix}/new"], [f"{prefix}/total"]),
        make("Sub", [f"{prefix}/total", one], [f"{prefix}/last"]),
        make("Expand", [f"{prefix}/last", f"{prefix}/batch"], [f"{prefix}/last_per_row"]),
        make("Cast", [f"{prefix}/last_per_row"], [out["seqlens_k"]], to=onnx.TensorProto.INT32),
        make("Squeeze", [f"{prefix}/total", zero], [f"{prefix}/total_scalar"]),
        make("Cast", [f"{prefix}/total_scalar"], [out["total_sequence_length"]], to=onnx.TensorProto.INT32),
        make("Slice", [names["attention_mask"], zero, f"{prefix}/total", axis_one], [f"{prefix}/mask"]),
        make("Equal", [f"{prefix}/mask", constant("zero_mask", np.array(0, np.int64))], [f"{prefix}/padding"]),
        make("Where", [f"{prefix}/padding", blocked, open_], [f"{prefix}/bias_rows"]),
        make("Unsqueeze", [f"{prefix}/bias_rows", constant("axes", np.array([1, 2], np.int64))], [f"{prefix}/bias"]),
        make("Concat", [f"{prefix}/batch", one, f"{prefix}/new", f"{prefix}/total"], [f"{prefix}/bias_shape"], axis=0),
        make("Expand", [f"{prefix}/bias", f"{prefix}/bias_shape"], [out["attention_bias"]]),
    ]
    return nodes, out


def fuse_group_query_attention(
    model: onnx.ModelProto, attention_mask: str, past_sequence_length: str, inputs_embeds: str
) -> int:
    """Rewrites each layer's attention over the key/value buffers into `GroupQueryAttention` (see the module
    docstring); the graph inputs are named by the arguments. Returns how many layers it rewrote."""
    inputs = {value.name: value for value in model.graph.input}
    if not {attention_mask, past_sequence_length, inputs_embeds} <= set(inputs):
        return 0
    dtype = inputs[inputs_embeds].type.tensor_type.elem_type
    names = {
        "attention_mask": attention_mask,
        "past_sequence_length": past_sequence_length,
        "inputs_embeds": inputs_embeds,
    }
    shared = None
    fused = 0
    for attention, match in _matches(model, "Attention", _attention_match):
        replacements = []
        if shared is None:
            shared_nodes, shared = _attention_inputs(model, names, dtype)
            replacements.append(([], shared_nodes, model.graph.node[0]))
        name = attention.name
        rotated = {}
        added = []
        for role, heads in (("query", match["num_heads"]), ("key", match["kv_num_heads"])):
            rotated[role] = f"{name}/{role}_rotated"
            added.append(
                onnx.helper.make_node(
                    "RotaryEmbedding",
                    [match[role], match["cos"], match["sin"]],
                    [rotated[role]],
                    name=f"{name}_{role}_rotary",
                    interleaved=0,
                    num_heads=heads,
                )
            )
        added.append(
            onnx.helper.make_node(
                "GroupQueryAttention",
                [
                    rotated["query"],
                    rotated["key"],
                    match["value"],
                    match["past_key"],
                    match["past_value"],
                    shared["seqlens_k"],
                    shared["total_sequence_length"],
                    "",
                    "",
                    "",
                    shared["attention_bias"],
                ],
                [match["output"], match["present_key"], match["present_value"]],
                name=f"{name}_gqa",
                domain=MS_DOMAIN,
                num_heads=match["num_heads"],
                kv_num_heads=match["kv_num_heads"],
                scale=float(_attribute(attention, "scale", match["head_dim"] ** -0.5)),
            )
        )
        _replace(model.graph, [*replacements, (match["remove"], added, attention)])
        fused += 1
    if fused:
        _use_ms_domain(model)
        _drop_unused(model.graph)
    return fused


def _use_ms_domain(model: onnx.ModelProto) -> None:
    if not any(opset.domain == MS_DOMAIN for opset in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Removes nodes none of whose outputs is used, and initializers nothing reads."""
    while True:
        used = {name for node in graph.node for name in node.input} | {value.name for value in graph.output}
        nodes = [node for node in graph.node if any(name in used for name in node.output if name)]
        if len(nodes) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(nodes)
    kept = [tensor for tensor in graph.initializer if tensor.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def fuse_decoder(
    model: onnx.ModelProto, attention_mask: str, past_sequence_length: str, inputs_embeds: str
) -> dict[str, int]:
    """Applies every rewrite of the module docstring to the decoder `model` in place (its graph inputs named by the
    arguments); returns how many of each it made."""
    return {
        "packed_matmuls": pack_matmuls(model),
        "skip_rms_norms": fuse_skip_rms_norm(model),
        "rotary_embeddings": fuse_rotary(model),
        "group_query_attentions": fuse_group_query_attention(
            model, attention_mask, past_sequence_length, inputs_embeds
        ),
    }
