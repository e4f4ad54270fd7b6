"""One base graph, many LoRA adapters: graph surgery, adapter files and their contract.

The model builder, given a PEFT adapter, exports each adapted projection as
``MatMul(x, W) + MatMul(MatMul(x, A), B)`` with A (``[in, r]``) and B (``[r, out]``, the LoRA
scaling folded in) as initializers named ``model.layers.N.attn.q_proj.lora_A.MatMul.weight``.
`extract_adapter_inputs` turns those initializers into graph inputs whose rank axis is symbolic
and leaves a rank-0 initializer of the same name as the default, so the graph runs as the plain
base model when no adapter is active (the idea of Olive's ExtractAdapters). Each adapter is then
written as an ``.onnx_adapter`` file (onnxruntime's adapter format) holding one tensor per graph
input, converted from the PEFT weights with the builder's own conventions.
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

LORA_NODE = re.compile(r"^/(?P<module>.+)/lora_(?P<ab>[AB])/MatMul$")
# PEFT weight key -> (module path, A or B). Adapter names inside keys ("lora_A.default") are
# removed by save_pretrained but tolerated.
PEFT_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$"
)
RANK_AXIS = {"A": 1, "B": 0}


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
    """One adapter input of the exported graph: its fixed dimension and element type."""

    name: str
    module: str
    ab: str  # "A" ([in, r]) or "B" ([r, out])
    fixed_dim: int  # `in` for A, `out` for B
    dtype: str  # numpy dtype name

    @property
    def rank_axis(self) -> int:
        return RANK_AXIS[self.ab]

    def shape(self, rank: int) -> tuple[int, int]:
        return (self.fixed_dim, rank) if self.ab == "A" else (rank, self.fixed_dim)


@dataclass
class GraphAdapterSpec:
    """All adapter inputs of a graph, by tensor name."""

    inputs: dict[str, AdapterInput] = field(default_factory=dict)

    @property
    def modules(self) -> set[str]:
        return {spec.module for spec in self.inputs.values()}

    @property
    def target_modules(self) -> list[str]:
        return sorted({module_suffix(m) for m in self.modules})

    def to_json(self) -> dict[str, Any]:
        return {
            name: {"module": s.module, "ab": s.ab, "fixedDim": s.fixed_dim, "dtype": s.dtype}
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


def read_peft_adapter(adapter_dir: Path, field: str, dtype: str = "float32") -> PeftAdapter:
    """Convert a PEFT LoRA directory into graph tensors, or `ExportError` naming `field`."""
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir, field)
    if config.get("use_dora"):
        raise ExportError(field, "DoRA adapters cannot be a runtime adapter; use adapterMode merge")
    if config.get("modules_to_save"):
        raise ExportError(
            field,
            f"the adapter also trains whole modules {config['modules_to_save']} "
            "(modulesToSave), which a runtime adapter cannot carry; use adapterMode merge",
        )
    if config.get("fan_in_fan_out"):
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


def lora_nodes_to_exclude(num_layers: int, target_modules: Iterable[str]) -> list[str]:
    """Names of the LoRA MatMuls the builder makes, to keep them out of quantization.

    Quantized LoRA MatMuls (MatMulNBits) bake the rank into their weights; they must stay
    float to take adapter tensors of any rank. Names of nodes that do not exist are harmless.
    """
    names = []
    for layer in range(num_layers):
        for module in target_modules:
            for block in ("attn", "mlp"):
                for ab in ("A", "B"):
                    names.append(f"/model/layers.{layer}/{block}/{module}/lora_{ab}/MatMul")
    return names


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


def write_union_adapter(
    shapes: Mapping[str, tuple[int, int]], target_modules: Iterable[str], out_dir: Path
) -> Path:
    """A zero rank-1 LoRA on `target_modules` of every layer, so the builder emits LoRA nodes
    for each module any adapter of the bundle adapts. Written without loading the model."""
    from safetensors.numpy import save_file

    targets = sorted(set(target_modules))
    tensors: dict[str, np.ndarray] = {}
    for module, (fan_in, fan_out) in shapes.items():
        if module_suffix(module) not in targets or ".layers." not in module:
            continue
        peft_module = module.replace(".attn.", ".self_attn.")
        tensors[f"base_model.model.{peft_module}.lora_A.weight"] = np.zeros((1, fan_in), np.float32)
        tensors[f"base_model.model.{peft_module}.lora_B.weight"] = np.zeros(
            (fan_out, 1), np.float32
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 1,
        "lora_alpha": 1,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "base_model_name_or_path": None,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def _np_dtype(onnx_type: int) -> str:
    from onnx import helper

    return str(np.dtype(helper.tensor_dtype_to_np_dtype(onnx_type)))


def extract_adapter_inputs(model_path: Path) -> GraphAdapterSpec:
    """Turn the LoRA A/B initializers of `model_path` into graph inputs, in place.

    Each input keeps a same-named initializer of rank 0 as its default (base behaviour).
    Raises `RuntimeError` when a LoRA MatMul was quantized or has no float initializer.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    existing_inputs = {i.name for i in graph.input}
    spec = GraphAdapterSpec()
    for node in graph.node:
        match = LORA_NODE.match(node.name)
        if match is None:
            continue
        if node.op_type != "MatMul":
            raise RuntimeError(
                f"LoRA node {node.name} is {node.op_type}, not MatMul: it was quantized; "
                "keep LoRA MatMuls out of quantization (nodes_to_exclude)"
            )
        weight = node.input[1]
        if weight in existing_inputs and weight not in initializers:
            continue  # already extracted
        init = initializers.get(weight)
        if init is None:
            raise RuntimeError(f"LoRA node {node.name} has no initializer for {weight}")
        ab = match["ab"]
        module = match["module"].replace("/", ".")
        dims = list(init.dims)
        fixed = dims[0] if ab == "A" else dims[1]
        spec.inputs[weight] = AdapterInput(
            name=weight, module=module, ab=ab, fixed_dim=int(fixed), dtype=_np_dtype(init.data_type)
        )
        rank_dim = f"{module}.rank"
        shape: list[int | str] = [fixed, rank_dim] if ab == "A" else [rank_dim, fixed]
        if weight not in existing_inputs:
            graph.input.append(helper.make_tensor_value_info(weight, init.data_type, shape))
            existing_inputs.add(weight)
        default = numpy_helper.from_array(
            np.zeros(spec.inputs[weight].shape(0), dtype=spec.inputs[weight].dtype), weight
        )
        init.CopyFrom(default)
    if not spec.inputs:
        raise RuntimeError(f"{model_path} has no LoRA nodes to turn into adapter inputs")
    onnx.save(model, str(model_path))
    return spec


# ---------------------------------------------------------------------------------------------
# The contract and the adapter files


def check_adapter(
    adapter: PeftAdapter, graph: GraphAdapterSpec, *, name: str, field: str
) -> dict[str, np.ndarray]:
    """Every graph input for this adapter, or `ExportError` naming the adapter and tensor.

    Modules the adapter does not target get rank-0 tensors (no contribution). Ranks may differ
    between adapters and modules: the graph's rank axes are symbolic.
    """
    missing = sorted(set(adapter.tensors) - set(graph.inputs))
    if missing:
        lacking = sorted({n.rsplit(".lora_", 1)[0] for n in missing})
        raise ExportError(
            field,
            f"adapter {name!r} targets modules the exported graph lacks: {lacking[:4]}"
            f"{' ...' if len(lacking) > 4 else ''} (tensor {missing[0]}); the graph has LoRA "
            f"inputs for {graph.target_modules}",
            "AdapterMismatch",
        )
    feeds: dict[str, np.ndarray] = {}
    for tensor, spec in graph.inputs.items():
        array = adapter.tensors.get(tensor)
        if array is None:
            feeds[tensor] = np.zeros(spec.shape(0), dtype=spec.dtype)
            continue
        rank = array.shape[spec.rank_axis] if array.ndim == 2 else -1
        if array.ndim != 2 or array.shape != spec.shape(rank):
            expected = "[in, r]" if spec.ab == "A" else "[r, out]"
            raise ExportError(
                field,
                f"adapter {name!r} tensor {tensor} has shape {list(array.shape)}, the graph "
                f"expects {expected} = {list(spec.shape(rank))}: was it trained on another "
                "base model?",
                "AdapterMismatch",
            )
        if str(array.dtype) != spec.dtype and np.dtype(spec.dtype).kind == "f":
            array = array.astype(spec.dtype)  # PEFT weights are float32; a fp16 graph gets fp16
        if str(array.dtype) != spec.dtype:
            raise ExportError(
                field,
                f"adapter {name!r} tensor {tensor} is {array.dtype}, the graph expects {spec.dtype}",
                "AdapterMismatch",
            )
        feeds[tensor] = array
    for module, rank in adapter.ranks.items():
        b = adapter.tensors[tensor_name(module, "B")]
        if b.shape[0] != rank:
            raise ExportError(
                field,
                f"adapter {name!r}: {module} has lora_A rank {rank} but lora_B rank {b.shape[0]}",
                "AdapterMismatch",
            )
    return feeds


def model_version(digest: str) -> int:
    """The adapter file's model version: the first 28 bits of the base graph's sha256."""
    return int(digest[:7], 16) if digest else 0


def write_adapter_file(feeds: Mapping[str, np.ndarray], path: Path, base_digest: str) -> Path:
    """Write `feeds` in onnxruntime's adapter format (read by og.Adapters.load)."""
    import onnxruntime as ort

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

    params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    return {name: value.numpy() for name, value in params.items()}


def verify_adapter_file(
    path: Path, graph: GraphAdapterSpec, ranks: Mapping[str, int], *, name: str, field: str
) -> None:
    """The written file holds exactly the graph's adapter inputs, by name, shape and dtype."""
    params = read_adapter_file(path)
    if set(params) != set(graph.inputs):
        extra = sorted(set(params) - set(graph.inputs))
        missing = sorted(set(graph.inputs) - set(params))
        raise ExportError(
            field,
            f"adapter file of {name!r} does not match the graph's adapter inputs "
            f"(unexpected {extra[:3]}, missing {missing[:3]})",
            "AdapterMismatch",
        )
    for tensor, spec in graph.inputs.items():
        value = params[tensor]
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
