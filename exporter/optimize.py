"""Graph rewrites that make the ONNX Runtime UNet fast on CPU, applied to the store's ORT variant of the UNet.

Profiling the plain export in ONNX Runtime (8 frames, 16x16 latents) showed attention dominating: each attention
runs as MatMul -> Softmax -> MatMul over a materialised `[B*F, heads, queries, keys]` score tensor, wrapped in
per-head Reshape/Transpose chains, and ONNX Runtime's own fusions and its transformer optimizer match none of it.
`fuse_attention` replaces every such subgraph, from the three `[N, L, C]` projections to the `[N, Lq, C]` result,
with one `com.microsoft.MultiHeadAttention` node, whose CPU kernel runs a tiled (flash) attention that never
writes the scores out. The shape arithmetic that fed the removed Reshapes goes with them (`prune`).

The TensorRT graph (`unet.onnx`) is left as exported: TensorRT fuses the SDPA pattern itself.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import onnx
from onnx import helper

from exporter.onnx_export import EXTERNAL_DATA_BYTES, ExportError

REWRITE_VERSION = 1  # part of the store key: entries rewritten by another version are rebuilt
MS_DOMAIN = "com.microsoft"
HEADS_FIRST = [0, 2, 1, 3]  # [N, L, heads, d] <-> [N, heads, L, d]
KEYS_TRANSPOSED = [0, 2, 3, 1]  # [N, L, heads, d] -> [N, heads, d, L]


class _Graph:
    """Producer and consumer lookups over a graph's nodes."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)

    def made_by(self, tensor: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(tensor)
        return node if node is not None and node.op_type == op_type else None

    def sole_consumer(self, tensor: str, op_type: str) -> onnx.NodeProto | None:
        users = self.consumers.get(tensor, [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None

    def split_heads(self, tensor: str, perm: list[int]) -> tuple[str, str] | None:
        """For `tensor` = Transpose(Reshape(x)) with `perm`, the `[N, L, C]` input x and the Transpose output."""
        transpose = self.made_by(tensor, "Transpose")
        if transpose is None or _perm(transpose) != perm:
            return None
        reshape = self.made_by(transpose.input[0], "Reshape")
        return (reshape.input[0], transpose.output[0]) if reshape is not None else None


def _perm(node: onnx.NodeProto) -> list[int]:
    return next(list(a.ints) for a in node.attribute if a.name == "perm")


def _static_dims(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Every intermediate tensor's inferred shape (None for a dimension that depends on the batch)."""
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    return {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}


def fuse_attention(model: onnx.ModelProto, shapes_of: onnx.ModelProto | None = None) -> int:
    """Replace each exported scaled-dot-product attention by `com.microsoft.MultiHeadAttention`; return how many.

    The pattern (what `torch.onnx.export` makes of `F.scaled_dot_product_attention` on split heads):
        q4 = Transpose[0,2,1,3](Reshape(q)), k4 = Transpose[0,2,3,1](Reshape(k)), v4 = Transpose[0,2,1,3](Reshape(v))
        out = Reshape(Transpose[0,2,1,3](MatMul(Softmax(MatMul(Mul(q4, s), Mul(k4, s))), v4)))
    with s * s = 1 / sqrt(head_dim). `shapes_of` is the model to infer shapes on (the same graph without its
    weights, for a model too large to pass through shape inference whole).
    """
    graph = _Graph(model.graph)
    dims = _static_dims(shapes_of or model)
    fused: dict[str, onnx.NodeProto] = {}  # output of the final Reshape -> the attention node replacing it
    for softmax in (n for n in model.graph.node if n.op_type == "Softmax"):
        scores = graph.made_by(softmax.input[0], "MatMul")
        weighted = graph.sole_consumer(softmax.output[0], "MatMul")
        if scores is None or weighted is None:
            continue
        scaled_q, scaled_k = graph.made_by(scores.input[0], "Mul"), graph.made_by(scores.input[1], "Mul")
        if scaled_q is None or scaled_k is None:
            continue
        q = graph.split_heads(scaled_q.input[0], HEADS_FIRST)
        k = graph.split_heads(scaled_k.input[0], KEYS_TRANSPOSED)
        v = graph.split_heads(weighted.input[1], HEADS_FIRST)
        merge = graph.sole_consumer(weighted.output[0], "Transpose")
        if q is None or k is None or v is None or merge is None or _perm(merge) != HEADS_FIRST:
            continue
        out = graph.sole_consumer(merge.output[0], "Reshape")
        heads, width = dims.get(q[1], [None] * 4)[1], dims.get(q[0], [None])[-1]
        if out is None or not heads or not width or len(dims.get(out.output[0], [])) != 3:
            continue
        fused[out.output[0]] = helper.make_node(
            "MultiHeadAttention", [q[0], k[0], v[0]], [out.output[0]],
            name=softmax.name.replace("Softmax", "MultiHeadAttention"),
            domain=MS_DOMAIN, num_heads=heads, scale=1.0 / math.sqrt(width // heads),
        )
    if fused:
        nodes = [fused.get(node.output[0], node) for node in model.graph.node]
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        if all(o.domain != MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        prune(model.graph)
    return len(fused)


def prune(graph: onnx.GraphProto) -> None:
    """Drop the nodes (and initializers) nothing downstream of the graph outputs reads; inputs stay."""
    live = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):  # exported graphs are topologically sorted
        if any(out in live for out in node.output):
            kept.append(node)
            live.update(name for name in node.input if name)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [t for t in graph.initializer if t.name in live]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    value_info = [v for v in graph.value_info if v.name in live]
    del graph.value_info[:]
    graph.value_info.extend(value_info)


def op_counts(path: Path) -> dict[str, int]:
    """How many nodes of each op type the graph at `path` has."""
    counts: dict[str, int] = defaultdict(int)
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] += 1
    return dict(counts)


def optimize_unet_for_ort(path: Path) -> dict:
    """Rewrite the ORT UNet graph at `path` in place; return what was done (recorded in the store index)."""
    before = op_counts(path)
    model = onnx.load(str(path))
    weightless = onnx.load(str(path), load_external_data=False)
    attention = fuse_attention(model, shapes_of=weightless)
    if attention != before.get("Softmax", 0):
        raise ExportError(f"{path.name}: fused {attention} of {before.get('Softmax', 0)} attentions; the export's "
                           "attention pattern changed")
    external = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    data = path.with_name(path.name + ".data")
    if external and data.exists():
        data.unlink()  # rewritten below; save_model would append to it
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=data.name)
    onnx.checker.check_model(str(path))
    return {"multihead_attention": attention, "nodes_before": sum(before.values()),
            "nodes_after": sum(op_counts(path).values())}
