"""One base graph, many LoRA adapters: graph surgery, adapter files and their contract.

The plain base is exported once by the model builder (fused Q/K/V projection, int4 weights).
`add_lora_inputs` then adds, after each adapted projection ``y = x W``, a LoRA branch
``y + (x A) B`` whose A (``[in, r]``) and B (``[r, out]``, LoRA scaling folded in) are graph
inputs with a symbolic rank axis, each with a rank-0 initializer of the same name as its
default (the idea of Olive's ExtractAdapters). Branches stay float whatever the base precision.
The packed ``qkv_proj`` keeps its fused int4 MatMul; its LoRA branch has one A/B pair per part
(q, k, v: inputs named ``model.layers.N.attn.q_proj.lora_A.MatMul.weight`` as the builder names
them) whose outputs are concatenated and added. A block-diagonal B would spend three times the
adapter bytes on zeros, and decode on the CPU is memory-bound. A model whose own weights are
packed (Phi-3's ``self_attn.qkv_proj``) is adapted on the packed projection: one A/B pair. The
LoRA graph and the plain graph share one external-data file.

Each adapter becomes an ``.onnx_adapter`` file (onnxruntime's adapter format) holding one tensor
per graph input, converted from the PEFT weights; modules it does not adapt get rank 0.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graft_trainer.export.errors import ExportError
from graft_trainer.export.merge import read_adapter_config

# PEFT weight key -> (module path, A or B). Adapter names inside keys ("lora_A.default") are
# removed by save_pretrained but tolerated.
PEFT_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$"
)


def graph_module(peft_module: str) -> str:
    """PEFT module path (model.layers.0.self_attn.q_proj) -> the builder's (model.layers.0.attn.q_proj)."""
    return peft_module.replace(".self_attn.", ".attn.")


def tensor_name(module: str, ab: str) -> str:
    return f"{module}.lora_{ab}.MatMul.weight"


def module_suffix(module: str) -> str:
    """model.layers.3.attn.q_proj -> q_proj (the target-module name)."""
    return module.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class AdapterInput:
    """One adapter input of the graph: A ``[in, r]`` or B ``[r, out]`` of one projection.

    `parts` are the PEFT-side modules the projection packs, with their output sizes, in
    output order: one for a plain projection, q/k/v for a packed ``qkv_proj``.
    """

    name: str
    module: str
    ab: str  # "A" or "B"
    fixed_dim: int  # `in` for A, `out` (sum of the parts) for B
    dtype: str  # numpy dtype name
    parts: tuple[tuple[str, int], ...] = ()

    def shape(self, rank: int) -> tuple[int, int]:
        return (self.fixed_dim, rank) if self.ab == "A" else (rank, self.fixed_dim)

    @property
    def part_modules(self) -> tuple[str, ...]:
        return tuple(m for m, _ in self.parts) or (self.module,)


@dataclass
class GraphAdapterSpec:
    """All adapter inputs of a graph, by tensor name."""

    inputs: dict[str, AdapterInput] = field(default_factory=dict)

    @property
    def modules(self) -> set[str]:
        """The PEFT-side modules an adapter may adapt (q_proj, not the packed qkv_proj)."""
        return {m for spec in self.inputs.values() for m in spec.part_modules}

    @property
    def target_modules(self) -> list[str]:
        return sorted({module_suffix(m) for m in self.modules})

    def to_json(self) -> dict[str, Any]:
        return {
            name: {
                "module": s.module,
                "ab": s.ab,
                "fixedDim": s.fixed_dim,
                "dtype": s.dtype,
                "parts": [list(p) for p in s.parts],
            }
            for name, s in sorted(self.inputs.items())
        }


# ---------------------------------------------------------------------------------------------
# Reading PEFT adapters


@dataclass
class PeftAdapter:
    """A LoRA adapter as the graph wants it: tensor name -> array (A transposed, B scaled)."""

    config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    ranks: dict[str, int]  # module -> rank

    @property
    def modules(self) -> set[str]:
        return set(self.ranks)

    @property
    def target_modules(self) -> list[str]:
        return sorted({module_suffix(m) for m in self.modules})

    @property
    def rank(self) -> int:
        return max(self.ranks.values(), default=0)


def _load_weights(adapter_dir: Path, field: str) -> dict[str, np.ndarray]:
    safetensors_path = adapter_dir / "adapter_model.safetensors"
    bin_path = adapter_dir / "adapter_model.bin"
    if safetensors_path.is_file():
        from safetensors.numpy import load_file

        try:
            return dict(load_file(str(safetensors_path)))
        except Exception:
            # bf16 has no numpy dtype: go through torch.
            from safetensors.torch import load_file as load_torch

            return {k: v.float().numpy() for k, v in load_torch(str(safetensors_path)).items()}
    if bin_path.is_file():
        import torch

        state = torch.load(str(bin_path), map_location="cpu", weights_only=True)
        return {k: v.float().numpy() for k, v in state.items()}
    raise ExportError(field, f"{adapter_dir} holds no adapter_model.safetensors or .bin")


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    # PEFT matches rank_pattern / alpha_pattern keys as regex against the module path's end.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def read_peft_adapter(
    adapter_dir: Path, field: str, dtype: str = "float32", runtime: bool = True
) -> PeftAdapter:
    """Convert a PEFT LoRA directory into graph tensors, or `ExportError` naming `field`.

    `runtime=False` (an adapter that will be merged): DoRA magnitudes and modulesToSave are
    allowed and skipped; only the LoRA A/B pairs are read, for the pre-flight shape check.
    """
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir, field)
    if runtime and config.get("use_dora"):
        raise ExportError(field, "DoRA adapters cannot be a runtime adapter; use adapterMode merge")
    if runtime and config.get("modules_to_save"):
        raise ExportError(
            field,
            f"the adapter also trains whole modules {config['modules_to_save']} "
            "(modulesToSave), which a runtime adapter cannot carry; use adapterMode merge",
        )
    if runtime and config.get("fan_in_fan_out"):
        raise ExportError(field, "fan_in_fan_out adapters (GPT-2 Conv1D) are not supported")
    weights = _load_weights(adapter_dir, field)
    r_default = int(config.get("r", 8))
    alpha_default = float(config.get("lora_alpha", r_default))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))
    tensors: dict[str, np.ndarray] = {}
    ranks: dict[str, int] = {}
    for key, value in weights.items():
        match = PEFT_KEY.match(key)
        if match is None and not runtime:
            continue
        if match is None:
            raise ExportError(
                field, f"adapter tensor {key} is not a LoRA A/B weight; only LoRA can be bundled"
            )
        peft_module, ab = match["module"], match["ab"]
        module = graph_module(peft_module)
        array = np.asarray(value, dtype=np.float32)
        if ab == "A":
            # PEFT lora_A.weight is [r, in]; the graph multiplies x @ A with A [in, r].
            ranks[module] = int(array.shape[0])
            tensors[tensor_name(module, "A")] = array.T.astype(dtype)
        else:
            rank = int(array.shape[1])
            r = int(_pattern_value(rank_pattern, peft_module, r_default))
            alpha = float(_pattern_value(alpha_pattern, peft_module, alpha_default))
            if r != rank:
                raise ExportError(
                    field, f"adapter tensor {key} has rank {rank}, but its config says r={r}"
                )
            scaling = alpha / math.sqrt(r) if rslora else alpha / r
            # lora_B.weight is [out, r]; the graph's B is [r, out] with the scaling folded in.
            tensors[tensor_name(module, "B")] = (array.T * scaling).astype(dtype)
    for module in ranks:
        if tensor_name(module, "B") not in tensors:
            raise ExportError(field, f"adapter has lora_A but no lora_B for {module}")
    return PeftAdapter(config=config, tensors=tensors, ranks=ranks)


# ---------------------------------------------------------------------------------------------
# Building the base graph with adapter inputs


def union_target_modules(adapters: Iterable[PeftAdapter]) -> list[str]:
    return sorted({m for adapter in adapters for m in adapter.target_modules})


def base_linear_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """Graph module path -> (in, out) of each 2-D weight in the base model, from the
    safetensors headers (no weights are read). Empty when the model has no safetensors."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, int]] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if not key.endswith(".weight"):
                    continue
                shape = handle.get_slice(key).get_shape()
                if len(shape) == 2:
                    module = graph_module(key[: -len(".weight")])
                    shapes[module] = (int(shape[1]), int(shape[0]))
    return shapes


RUNTIME_MODULE = re.compile(r"^model\.layers\.\d+\.(attn|mlp)\.\w+_proj$")


# Packed projections the model builder splits into separate MatMuls (Phi-3's MLP becomes
# gate_proj and up_proj): a runtime adapter on the packed weight has no graph input to feed.
SPLIT_BY_BUILDER = ("gate_up_proj",)


def check_runtime_modules(adapter: PeftAdapter, *, name: str, field: str) -> None:
    """Pre-flight: a runtime adapter can only adapt the decoder layers' projections."""
    split = sorted(m for m in adapter.modules if module_suffix(m) in SPLIT_BY_BUILDER)
    if split:
        raise ExportError(
            field,
            f"adapter {name!r} adapts {module_suffix(split[0])} ({split[0]}), which the ONNX "
            "model builder splits into gate_proj and up_proj: a runtime adapter cannot adapt it "
            "(train without it in lora.targetModules, or merge it: adapterMode merge)",
            "AdapterMismatch",
        )
    other = sorted(m for m in adapter.modules if not RUNTIME_MODULE.match(m))
    if other:
        raise ExportError(
            field,
            f"adapter {name!r} adapts {other[:4]}, which the exported graph lacks as adapter "
            "inputs: a runtime adapter can only adapt the attention and MLP projections of the "
            "decoder layers (merge it into the weights instead)",
            "AdapterMismatch",
        )


def check_against_base(
    adapter: PeftAdapter, shapes: Mapping[str, tuple[int, int]], *, name: str, field: str
) -> None:
    """Pre-flight: every adapted module exists in the base with the adapter's in/out sizes."""
    if not shapes:
        return
    for module in sorted(adapter.modules):
        a = adapter.tensors[tensor_name(module, "A")]
        b = adapter.tensors[tensor_name(module, "B")]
        base = shapes.get(module)
        if base is None:
            raise ExportError(
                field,
                f"adapter {name!r} adapts {module}, which the base model does not have: "
                "was it trained on another base model?",
                "AdapterMismatch",
            )
        if (a.shape[0], b.shape[1]) != base:
            raise ExportError(
                field,
                f"adapter {name!r} adapts {module} as {a.shape[0]} -> {b.shape[1]} features, the "
                f"base model's {module} is {base[0]} -> {base[1]}: it was trained on another "
                "base model",
                "AdapterMismatch",
            )


PROJECTION_NODE = re.compile(
    r"^/model/layers\.(?P<layer>\d+)/(?P<block>attn|mlp)/(?P<proj>\w+_proj)/MatMul[\w]*$"
)
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _np_dtype(onnx_type: int) -> str:
    from onnx import helper

    return str(np.dtype(helper.tensor_dtype_to_np_dtype(onnx_type)))


def add_lora_inputs(
    source: Path,
    target: Path,
    target_modules: Iterable[str],
    shapes: Mapping[str, tuple[int, int]],
) -> GraphAdapterSpec:
    """Write `target`: the graph `source` with a LoRA branch after each projection whose
    module (or a module it packs) is in `target_modules`. Both graphs must live in the same
    directory: the weights stay in `source`'s external data, which `target` references.

    `shapes`: graph module path -> (in, out) of the base model's projections
    (`base_linear_shapes`), for the sizes of packed parts.
    """
    import onnx
    from onnx import helper, numpy_helper

    targets = set(target_modules)
    model = onnx.load(str(source), load_external_data=False)
    graph = model.graph
    io_type = graph.output[0].type.tensor_type.elem_type  # logits: the model's I/O type
    dtype = _np_dtype(io_type)
    spec = GraphAdapterSpec()
    nodes = []
    defaults = []
    for node in graph.node:
        nodes.append(node)
        match = PROJECTION_NODE.match(node.name)
        if match is None or node.op_type not in ("MatMul", "MatMulNBits"):
            continue
        proj = match["proj"]
        prefix = f"model.layers.{match['layer']}.{match['block']}"
        part_names = PACKED.get(proj, (proj,))
        if proj in targets and f"{prefix}.{proj}" in shapes:
            # The model packs the projection itself (Phi-3's qkv_proj): one A/B pair for it.
            part_names = (proj,)
        if not targets.intersection(part_names):
            continue
        parts = []
        for part in part_names:
            size = shapes.get(f"{prefix}.{part}")
            if size is None:
                raise RuntimeError(f"base model has no weight for {prefix}.{part}")
            parts.append((f"{prefix}.{part}", size))
        # y = x W  becomes  y = x W + concat_p((x A_p) B_p), under the original output name:
        # one A/B pair per packed part, so no adapter bytes are spent on zero blocks.
        base = f"/model/layers.{match['layer']}/{match['block']}/{proj}/lora"
        out = node.output[0]
        node.output[0] = f"{base}/base_output"
        branch_outputs = []
        for part_module, (fan_in, fan_out) in parts:
            part = module_suffix(part_module)
            a_name, b_name = tensor_name(part_module, "A"), tensor_name(part_module, "B")
            rank = f"{part_module}.rank"
            spec.inputs[a_name] = AdapterInput(
                a_name, part_module, "A", fan_in, dtype, ((part_module, fan_in),)
            )
            spec.inputs[b_name] = AdapterInput(
                b_name, part_module, "B", fan_out, dtype, ((part_module, fan_out),)
            )
            graph.input.append(helper.make_tensor_value_info(a_name, io_type, [fan_in, rank]))
            graph.input.append(helper.make_tensor_value_info(b_name, io_type, [rank, fan_out]))
            defaults.append(numpy_helper.from_array(np.zeros((fan_in, 0), dtype), a_name))
            defaults.append(numpy_helper.from_array(np.zeros((0, fan_out), dtype), b_name))
            prefix_name = f"{base}/{part}" if len(parts) > 1 else base
            nodes.append(
                helper.make_node(
                    "MatMul",
                    [node.input[0], a_name],
                    [f"{prefix_name}/xA"],
                    f"{prefix_name}_A/MatMul",
                )
            )
            nodes.append(
                helper.make_node(
                    "MatMul",
                    [f"{prefix_name}/xA", b_name],
                    [f"{prefix_name}/xAB"],
                    f"{prefix_name}_B/MatMul",
                )
            )
            branch_outputs.append(f"{prefix_name}/xAB")
        delta = branch_outputs[0]
        if len(branch_outputs) > 1:
            delta = f"{base}/delta"
            nodes.append(
                helper.make_node("Concat", branch_outputs, [delta], f"{base}/Concat", axis=-1)
            )
        nodes.append(helper.make_node("Add", [node.output[0], delta], [out], f"{base}/Add"))
    if not spec.inputs:
        raise RuntimeError(f"{source} has no projections for target modules {sorted(targets)}")
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(defaults)
    onnx.save(model, str(target))
    return spec


# ---------------------------------------------------------------------------------------------
# The contract and the adapter files


def check_adapter(
    adapter: PeftAdapter, graph: GraphAdapterSpec, *, name: str, field: str
) -> dict[str, np.ndarray]:
    """Every graph input for this adapter, or `ExportError` naming the adapter and tensor.

    Modules the adapter does not adapt get rank 0 (no contribution); the parts of a packed
    projection are stacked (A) and placed block-diagonally (B). Ranks may differ between
    adapters and modules: the graph's rank axes are symbolic.
    """
    covered = graph.modules
    lacking = sorted(adapter.modules - covered)
    if lacking:
        raise ExportError(
            field,
            f"adapter {name!r} adapts modules the exported graph lacks: {lacking[:4]}"
            f"{' ...' if len(lacking) > 4 else ''} (tensor {tensor_name(lacking[0], 'A')}); "
            f"the graph has LoRA inputs for {graph.target_modules}",
            "AdapterMismatch",
        )
    for module, rank in adapter.ranks.items():
        b = adapter.tensors[tensor_name(module, "B")]
        if b.ndim != 2 or b.shape[0] != rank:
            raise ExportError(
                field,
                f"adapter {name!r}: {module} has lora_A rank {rank} but lora_B shape "
                f"{list(b.shape)}",
                "AdapterMismatch",
            )
    feeds: dict[str, np.ndarray] = {}
    for tensor, spec in graph.inputs.items():
        blocks = []
        for module, size in spec.parts or ((spec.module, spec.fixed_dim),):
            part_name = tensor_name(module, spec.ab)
            array = adapter.tensors.get(part_name)
            rank = adapter.ranks.get(module, 0)
            expected = (size, rank) if spec.ab == "A" else (rank, size)
            if array is None:
                array = np.zeros(expected, dtype=np.float32)
            if array.shape != expected:
                layout = "[in, r]" if spec.ab == "A" else "[r, out]"
                raise ExportError(
                    field,
                    f"adapter {name!r} tensor {part_name} has shape {list(array.shape)}, the "
                    f"graph expects {layout} = {list(expected)}: was it trained on another "
                    "base model?",
                    "AdapterMismatch",
                )
            blocks.append(array)
        if spec.ab == "A":
            value = np.concatenate(blocks, axis=1)
        else:
            value = np.zeros((sum(b.shape[0] for b in blocks), spec.fixed_dim), np.float32)
            row = col = 0
            for block in blocks:
                value[row : row + block.shape[0], col : col + block.shape[1]] = block
                row, col = row + block.shape[0], col + block.shape[1]
        if np.dtype(spec.dtype).kind != "f":
            raise ExportError(
                field,
                f"adapter {name!r} tensor {tensor}: the graph expects {spec.dtype}",
                "AdapterMismatch",
            )
        feeds[tensor] = np.ascontiguousarray(value.astype(spec.dtype))
    return feeds


def graph_ranks(adapter: PeftAdapter, graph: GraphAdapterSpec) -> dict[str, int]:
    """Graph module -> the rank of its adapter inputs for `adapter` (packed parts add up)."""
    ranks: dict[str, int] = {}
    for spec in graph.inputs.values():
        ranks[spec.module] = sum(adapter.ranks.get(m, 0) for m in spec.part_modules)
    return ranks


def model_version(digest: str) -> int:
    """The adapter file's model version: the first 28 bits of the base graph's sha256."""
    digest = digest.removeprefix("sha256:")
    return int(digest[:7], 16) if digest else 0


def write_adapter_file(feeds: Mapping[str, np.ndarray], path: Path, base_digest: str) -> Path:
    """Write `feeds` in onnxruntime's adapter format (read by og.Adapters.load).

    Empty (rank-0) tensors are left out: the graph's rank-0 defaults stand in for them (what
    og does for inputs an adapter does not set), and AdapterFormat.export_adapter can crash
    on zero-size tensors.
    """
    import onnxruntime as ort

    feeds = {name: array for name, array in feeds.items() if array.size}
    if not feeds:
        raise ValueError(f"adapter for {path} has no non-empty tensors")

    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(model_version(base_digest))
    # OrtValues borrow the arrays' memory: keep both alive until the file is written.
    arrays = {name: np.ascontiguousarray(a) for name, a in feeds.items()}
    values = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in arrays.items()}
    adapter.set_parameters(values)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    adapter.export_adapter(str(path))
    del values, arrays
    return path


def read_adapter_file(path: Path) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    adapter = ort.AdapterFormat.read_adapter(str(path))
    params = adapter.get_parameters()
    # The values borrow the adapter's memory: copy them while it is alive.
    arrays = {name: np.array(value.numpy(), copy=True) for name, value in params.items()}
    del params, adapter
    return arrays


def verify_adapter_file(
    path: Path, graph: GraphAdapterSpec, ranks: Mapping[str, int], *, name: str, field: str
) -> None:
    """The written file holds a tensor, of the graph's name, shape and dtype, for every module
    the adapter adapts; the modules it leaves out run with the graph's rank-0 defaults."""
    params = read_adapter_file(path)
    unknown = sorted(set(params) - set(graph.inputs))
    expected_names = {n for n, s in graph.inputs.items() if ranks.get(s.module, 0) > 0}
    missing = sorted(expected_names - set(params))
    if unknown or missing:
        raise ExportError(
            field,
            f"adapter file of {name!r} does not match the graph's adapter inputs "
            f"(unknown {unknown[:3]}, missing {missing[:3]})",
            "AdapterMismatch",
        )
    for tensor, value in params.items():
        spec = graph.inputs[tensor]
        expected = spec.shape(ranks.get(spec.module, 0))
        if tuple(value.shape) != expected or str(value.dtype) != spec.dtype:
            raise ExportError(
                field,
                f"adapter {name!r} tensor {tensor} is {value.dtype}{list(value.shape)}, the graph "
                f"expects {spec.dtype}{list(expected)}",
                "AdapterMismatch",
            )


def save_graph_spec(graph: GraphAdapterSpec, path: Path) -> None:
    Path(path).write_text(json.dumps(graph.to_json(), indent=2, sort_keys=True) + "\n")
