"""Graph surgery and the adapter contract on a tiny synthetic ONNX graph (no model builder)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("safetensors")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from graft_trainer.export import bundle  # noqa: E402
from graft_trainer.export.errors import ExportError  # noqa: E402

IN, OUT, RANK = 8, 6, 2
MODULE = "model.layers.0.attn.q_proj"
A_NAME = f"{MODULE}.lora_A.MatMul.weight"
B_NAME = f"{MODULE}.lora_B.MatMul.weight"


def lora_graph(path: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """y = x @ W + (x @ A) @ B, named like the model builder names a LoRA projection."""
    w = rng.standard_normal((IN, OUT)).astype(np.float32)
    a = rng.standard_normal((IN, RANK)).astype(np.float32)
    b = rng.standard_normal((RANK, OUT)).astype(np.float32)
    base = "/model/layers.0/attn/q_proj"
    nodes = [
        helper.make_node("MatMul", ["x", f"{MODULE}.MatMul.weight"], ["base"], f"{base}/MatMul"),
        helper.make_node("MatMul", ["x", A_NAME], ["xa"], f"{base}/lora_A/MatMul"),
        helper.make_node("MatMul", ["xa", B_NAME], ["xab"], f"{base}/lora_B/MatMul"),
        helper.make_node("Add", ["base", "xab"], ["y"], f"{base}/lora/Add"),
    ]
    graph = helper.make_graph(
        nodes,
        "lora",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", OUT])],
        initializer=[
            numpy_helper.from_array(w, f"{MODULE}.MatMul.weight"),
            numpy_helper.from_array(a, A_NAME),
            numpy_helper.from_array(b, B_NAME),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return {"w": w, "a": a, "b": b}


def run(path: Path, x: np.ndarray, feeds: dict[str, np.ndarray] | None = None) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    result = session.run(["y"], {"x": x, **(feeds or {})})[0]
    return np.asarray(result)


def test_initializers_become_inputs_with_a_rank_zero_default(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "model.onnx"
    weights = lora_graph(path, rng)
    x = rng.standard_normal((3, IN)).astype(np.float32)
    baked = run(path, x)

    spec = bundle.extract_adapter_inputs(path)

    assert set(spec.inputs) == {A_NAME, B_NAME}
    assert spec.inputs[A_NAME].shape(5) == (IN, 5) and spec.inputs[B_NAME].shape(5) == (5, OUT)
    assert spec.target_modules == ["q_proj"]
    model = onnx.load(str(path))
    dims = {
        i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input
    }
    assert dims[A_NAME] == [IN, f"{MODULE}.rank"] and dims[B_NAME] == [f"{MODULE}.rank", OUT]
    defaults = {i.name: tuple(i.dims) for i in model.graph.initializer}
    assert defaults[A_NAME] == (IN, 0) and defaults[B_NAME] == (0, OUT)
    # No adapter: the base alone. The original adapter fed back: the baked-in result.
    np.testing.assert_allclose(run(path, x), x @ weights["w"], rtol=1e-5, atol=1e-5)
    fed = run(path, x, {A_NAME: weights["a"], B_NAME: weights["b"]})
    np.testing.assert_allclose(fed, baked, rtol=1e-5, atol=1e-5)
    # Another rank works too: the rank axis is symbolic.
    a4, b4 = np.ones((IN, 4), np.float32), np.ones((4, OUT), np.float32)
    np.testing.assert_allclose(
        run(path, x, {A_NAME: a4, B_NAME: b4}), x @ weights["w"] + x @ a4 @ b4, rtol=1e-4
    )
    # Idempotent.
    assert set(bundle.extract_adapter_inputs(path).inputs) == {A_NAME, B_NAME}


def test_quantized_lora_node_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    lora_graph(path, np.random.default_rng(0))
    model = onnx.load(str(path))
    model.graph.node[1].op_type = "MatMulNBits"
    onnx.save(model, str(path))
    with pytest.raises(RuntimeError, match="quantized"):
        bundle.extract_adapter_inputs(path)


def write_peft(
    directory: Path,
    tensors: dict[str, np.ndarray],
    *,
    r: int = RANK,
    alpha: float = 4.0,
    **config: object,
) -> Path:
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    body = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj"]}
    body.update(config)
    (directory / "adapter_config.json").write_text(json.dumps(body))
    return directory


def peft_tensors(rank: int = RANK, fan_in: int = IN) -> dict[str, np.ndarray]:
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    rng = np.random.default_rng(1)
    return {
        f"{prefix}.lora_A.weight": rng.standard_normal((rank, fan_in)).astype(np.float32),
        f"{prefix}.lora_B.weight": rng.standard_normal((OUT, rank)).astype(np.float32),
    }


def test_peft_weights_are_transposed_and_scaled(tmp_path: Path) -> None:
    raw = peft_tensors()
    adapter = bundle.read_peft_adapter(write_peft(tmp_path / "a", raw), "spec.adapters[0]")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    np.testing.assert_array_equal(adapter.tensors[A_NAME], raw[f"{prefix}.lora_A.weight"].T)
    np.testing.assert_allclose(adapter.tensors[B_NAME], raw[f"{prefix}.lora_B.weight"].T * 2.0)
    assert adapter.ranks == {MODULE: RANK} and adapter.target_modules == ["q_proj"]
    rs = bundle.read_peft_adapter(write_peft(tmp_path / "rs", raw, use_rslora=True), "f")
    np.testing.assert_allclose(
        rs.tensors[B_NAME], raw[f"{prefix}.lora_B.weight"].T * 4.0 / np.sqrt(RANK), rtol=1e-6
    )


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"modules_to_save": ["lm_head"]}, "modulesToSave"),
        ({"use_dora": True}, "DoRA"),
        ({"peft_type": "IA3"}, "only LoRA"),
    ],
)
def test_adapters_a_runtime_adapter_cannot_carry_are_refused(
    tmp_path: Path, config: dict[str, object], expected: str
) -> None:
    path = write_peft(tmp_path / "a", peft_tensors(), **config)
    with pytest.raises(ExportError, match=expected) as caught:
        bundle.read_peft_adapter(path, "spec.adapters[2]")
    assert caught.value.field == "spec.adapters[2]"


def graph_spec() -> bundle.GraphAdapterSpec:
    return bundle.GraphAdapterSpec(
        inputs={
            A_NAME: bundle.AdapterInput(A_NAME, MODULE, "A", IN, "float32"),
            B_NAME: bundle.AdapterInput(B_NAME, MODULE, "B", OUT, "float32"),
        }
    )


def test_contract_names_adapter_and_tensor_on_shape_mismatch(tmp_path: Path) -> None:
    wide = bundle.read_peft_adapter(write_peft(tmp_path / "a", peft_tensors(fan_in=16)), "f")
    with pytest.raises(ExportError) as caught:
        bundle.check_adapter(wide, graph_spec(), name="writer", field="spec.adapters[1]")
    err = caught.value
    assert err.field == "spec.adapters[1]" and err.reason == "AdapterMismatch"
    assert "'writer'" in err.message and A_NAME in err.message and "[16, 2]" in err.message


def test_contract_names_modules_the_graph_lacks(tmp_path: Path) -> None:
    tensors = {
        "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": np.zeros((2, IN), np.float32),
        "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": np.zeros((OUT, 2), np.float32),
    }
    adapter = bundle.read_peft_adapter(write_peft(tmp_path / "a", tensors), "f")
    with pytest.raises(ExportError, match="lacks") as caught:
        bundle.check_adapter(adapter, graph_spec(), name="classifier", field="spec.adapters[0]")
    assert "'classifier'" in caught.value.message and "up_proj" in caught.value.message
    assert "['q_proj']" in caught.value.message


def test_contract_pads_untargeted_modules_with_rank_zero_and_ranks_may_differ(
    tmp_path: Path,
) -> None:
    spec = graph_spec()
    other = "model.layers.0.attn.v_proj"
    spec.inputs[f"{other}.lora_A.MatMul.weight"] = bundle.AdapterInput(
        f"{other}.lora_A.MatMul.weight", other, "A", IN, "float32"
    )
    spec.inputs[f"{other}.lora_B.MatMul.weight"] = bundle.AdapterInput(
        f"{other}.lora_B.MatMul.weight", other, "B", 4, "float32"
    )
    adapter = bundle.read_peft_adapter(write_peft(tmp_path / "a", peft_tensors(rank=5), r=5), "f")
    feeds = bundle.check_adapter(adapter, spec, name="a", field="f")
    assert feeds[A_NAME].shape == (IN, 5)
    assert feeds[f"{other}.lora_A.MatMul.weight"].shape == (IN, 0)
    assert feeds[f"{other}.lora_B.MatMul.weight"].shape == (0, 4)
    path = bundle.write_adapter_file(feeds, tmp_path / "a.onnx_adapter", "ab" * 32)
    back = bundle.read_adapter_file(path)
    assert set(back) == set(feeds)
    for name, value in feeds.items():
        np.testing.assert_array_equal(back[name], value)
    bundle.verify_adapter_file(path, spec, adapter.ranks, name="a", field="f")
    with pytest.raises(ExportError, match="expects"):
        bundle.verify_adapter_file(path, spec, {MODULE: 3}, name="a", field="f")


def test_union_adapter_targets_every_layer(tmp_path: Path) -> None:
    shapes = {
        "model.layers.0.attn.q_proj": (8, 8),
        "model.layers.1.attn.q_proj": (8, 8),
        "model.layers.0.mlp.up_proj": (8, 16),
        "lm_head": (8, 32),
    }
    out = bundle.write_union_adapter(shapes, ["q_proj"], tmp_path / "u")
    adapter = bundle.read_peft_adapter(out, "f")
    assert adapter.modules == {"model.layers.0.attn.q_proj", "model.layers.1.attn.q_proj"}
    assert adapter.tensors["model.layers.1.attn.q_proj.lora_B.MatMul.weight"].shape == (1, 8)
    names = bundle.lora_nodes_to_exclude(2, ["q_proj"])
    assert "/model/layers.1/attn/q_proj/lora_B/MatMul" in names
