"""Other layouts of a bundle's LoRA branches, for `onnx_decode.py --layouts` to measure against
the shipped one in the same run (issue 19's levers for the adapter decode overhead).

The shipped layout (`graft_trainer.export.bundle.add_lora_inputs`) adds, after a packed q/k/v
projection, one A/B MatMul pair per part, a Concat and an Add (eight nodes), and three nodes
after a plain projection; the weights are float32 graph inputs. The alternatives:

- ``stacked``: one A per packed projection (the parts' A side by side, ``[in, r_q+r_k+r_v]``)
  and one block-diagonal B: three nodes per projection, and B's zero blocks cost bytes.
- ``split_fp16`` / ``stacked_fp16``: the same with float16 adapter weights; the float32
  activations are cast to float16 before the branch and its output back (two more nodes).

Each layout is written beside the bundle's graphs (sharing ``model.onnx.data``) with its own
adapter file, converted from the same PEFT adapter by the bundle's own contract code
(`check_adapter`: A stacked, B block-diagonal). Bench code only: bundles ship the shipped layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from graft_trainer.export import bundle

LAYOUTS = ("stacked", "split_fp16", "stacked_fp16")


def build_layout(
    model_dir: Path,
    layout: str,
    adapter: bundle.PeftAdapter,
    shapes: Mapping[str, tuple[int, int]],
    base_graph: str = "base.onnx",
) -> tuple[str, Path]:
    """Write ``<layout>.onnx`` (from `base_graph`, LoRA branches on the adapter's targets) and
    ``<layout>.onnx_adapter`` into `model_dir`: (graph file name, adapter file)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; one of {LAYOUTS}")
    stacked, fp16 = layout.startswith("stacked"), layout.endswith("_fp16")
    dtype = "float16" if fp16 else "float32"
    elem = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    targets = set(adapter.target_modules)
    model = onnx.load(str(Path(model_dir) / base_graph), load_external_data=False)
    graph = model.graph
    spec = bundle.GraphAdapterSpec()
    nodes, defaults = [], []

    def add_input(name: str, module: str, ab: str, fixed: int, parts: tuple, rank: str) -> None:
        spec.inputs[name] = bundle.AdapterInput(name, module, ab, fixed, dtype, parts)
        dims = [fixed, rank] if ab == "A" else [rank, fixed]
        graph.input.append(helper.make_tensor_value_info(name, elem, dims))
        empty = np.zeros((fixed, 0) if ab == "A" else (0, fixed), dtype)
        defaults.append(numpy_helper.from_array(empty, name))

    for node in graph.node:
        nodes.append(node)
        match = bundle.PROJECTION_NODE.match(node.name)
        if match is None or node.op_type not in ("MatMul", "MatMulNBits"):
            continue
        proj = match["proj"]
        prefix = f"model.layers.{match['layer']}.{match['block']}"
        part_names = bundle.PACKED.get(proj, (proj,))
        if proj in targets and f"{prefix}.{proj}" in shapes:
            part_names = (proj,)
        if not targets.intersection(part_names):
            continue
        parts = [(f"{prefix}.{p}", shapes[f"{prefix}.{p}"]) for p in part_names]
        base = f"/model/layers.{match['layer']}/{match['block']}/{proj}/lora"
        out = node.output[0]
        node.output[0] = f"{base}/base_output"
        x = node.input[0]
        if fp16:
            nodes.append(helper.make_node("Cast", [x], [f"{base}/x16"], f"{base}/CastIn", to=elem))
            x = f"{base}/x16"
        if stacked:
            module = f"{prefix}.{proj}"
            groups = [
                (module, tuple((m, s[0]) for m, s in parts), tuple((m, s[1]) for m, s in parts))
            ]
        else:
            groups = [(m, ((m, s[0]),), ((m, s[1]),)) for m, s in parts]
        deltas = []
        for module, a_parts, b_parts in groups:
            a_name, b_name = bundle.tensor_name(module, "A"), bundle.tensor_name(module, "B")
            rank = f"{module}.rank"
            add_input(a_name, module, "A", a_parts[0][1], a_parts, rank)
            add_input(b_name, module, "B", sum(s for _, s in b_parts), b_parts, rank)
            tag = f"{base}/{bundle.module_suffix(module)}"
            nodes.append(helper.make_node("MatMul", [x, a_name], [f"{tag}/xA"], f"{tag}_A/MatMul"))
            nodes.append(
                helper.make_node("MatMul", [f"{tag}/xA", b_name], [f"{tag}/xAB"], f"{tag}_B/MatMul")
            )
            deltas.append(f"{tag}/xAB")
        delta = deltas[0]
        if len(deltas) > 1:
            delta = f"{base}/delta"
            nodes.append(helper.make_node("Concat", deltas, [delta], f"{base}/Concat", axis=-1))
        if fp16:
            nodes.append(
                helper.make_node(
                    "Cast", [delta], [f"{base}/delta32"], f"{base}/CastOut", to=TensorProto.FLOAT
                )
            )
            delta = f"{base}/delta32"
        nodes.append(helper.make_node("Add", [node.output[0], delta], [out], f"{base}/Add"))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(defaults)
    filename = f"{layout}.onnx"
    onnx.save(model, str(Path(model_dir) / filename))
    feeds = bundle.check_adapter(adapter, spec, name=layout, field="bench")
    path = bundle.write_adapter_file(feeds, Path(model_dir) / f"{layout}.onnx_adapter", "")
    return filename, path
