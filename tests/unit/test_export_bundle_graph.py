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
Q, KV = 8, 4  # packed q/k/v output sizes
MODULE = "model.layers.0.attn.q_proj"
A_NAME = f"{MODULE}.lora_A.MatMul.weight"
B_NAME = f"{MODULE}.lora_B.MatMul.weight"
SHAPES = {
    "model.layers.0.attn.q_proj": (IN, Q),
    "model.layers.0.attn.k_proj": (IN, KV),
    "model.layers.0.attn.v_proj": (IN, KV),
    "model.layers.0.attn.o_proj": (Q, IN),
}


def base_graph(path: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """What the builder exports for one layer: y = (x @ Wqkv) @ Wo, named like it does."""
    wqkv = rng.standard_normal((IN, Q + 2 * KV)).astype(np.float32)
    wo = rng.standard_normal((Q, IN)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "wqkv"], ["qkv"], "/model/layers.0/attn/qkv_proj/MatMul"),
        helper.make_node("Slice", ["qkv", "s0", "s1", "ax"], ["q"], "/model/layers.0/attn/Slice"),
        helper.make_node("MatMul", ["q", "wo"], ["o"], "/model/layers.0/attn/o_proj/MatMul"),
    ]
    ints = {"s0": [0], "s1": [Q], "ax": [1]}
    graph = helper.make_graph(
        nodes,
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", IN])],
        [
            helper.make_tensor_value_info("o", TensorProto.FLOAT, ["batch", IN]),
            helper.make_tensor_value_info("qkv", TensorProto.FLOAT, ["batch", Q + 2 * KV]),
        ],
        initializer=[
            numpy_helper.from_array(wqkv, "wqkv"),
            numpy_helper.from_array(wo, "wo"),
            *(numpy_helper.from_array(np.array(v, np.int64), k) for k, v in ints.items()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return {"wqkv": wqkv, "wo": wo}


def run(path: Path, x: np.ndarray, feeds: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [np.asarray(v) for v in session.run(["o", "qkv"], {"x": x, **(feeds or {})})]


def peft_module(
    module: str, rank: int, fan_in: int, fan_out: int, seed: int
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    prefix = "base_model.model." + module.replace(".attn.", ".self_attn.")
    return {
        f"{prefix}.lora_A.weight": rng.standard_normal((rank, fan_in)).astype(np.float32),
        f"{prefix}.lora_B.weight": rng.standard_normal((fan_out, rank)).astype(np.float32),
    }


def test_lora_branches_on_the_packed_projection_match_peft_math(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weights = base_graph(tmp_path / "base.onnx", rng)
    spec = bundle.add_lora_inputs(
        tmp_path / "base.onnx", tmp_path / "model.onnx", ["q_proj", "v_proj"], SHAPES
    )
    # One branch on the packed qkv projection, with an A/B pair per part; none on o_proj.
    parts = {"q_proj": Q, "k_proj": KV, "v_proj": KV}
    names = {f"model.layers.0.attn.{p}.lora_{ab}.MatMul.weight" for p in parts for ab in "AB"}
    assert set(spec.inputs) == names
    assert spec.target_modules == ["k_proj", "q_proj", "v_proj"]
    model = onnx.load(str(tmp_path / "model.onnx"))
    dims = {
        i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input
    }
    defaults = {i.name: tuple(i.dims) for i in model.graph.initializer if "lora" in i.name}
    for part, size in parts.items():
        module = f"model.layers.0.attn.{part}"
        assert dims[f"{module}.lora_A.MatMul.weight"] == [IN, f"{module}.rank"]
        assert dims[f"{module}.lora_B.MatMul.weight"] == [f"{module}.rank", size]
        assert defaults[f"{module}.lora_A.MatMul.weight"] == (IN, 0)
        assert defaults[f"{module}.lora_B.MatMul.weight"] == (0, size)
    ops = [n.op_type for n in model.graph.node if "/lora" in n.name]
    assert ops.count("MatMul") == 6 and ops.count("Concat") == 1 and ops.count("Add") == 1

    x = rng.standard_normal((3, IN)).astype(np.float32)
    o, qkv = run(tmp_path / "model.onnx", x)  # no adapter: the base
    np.testing.assert_allclose(qkv, x @ weights["wqkv"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(o, run(tmp_path / "base.onnx", x)[0], rtol=1e-5, atol=1e-5)

    # An adapter on q (rank 2) and v (rank 3), none on k: PEFT's x A^T B^T * scaling per part.
    raw = {
        **peft_module("model.layers.0.attn.q_proj", 2, IN, Q, 1),
        **peft_module("model.layers.0.attn.v_proj", 3, IN, KV, 2),
    }
    adapter = bundle.read_peft_adapter(
        write_peft(tmp_path / "a", raw, r=2, alpha=4.0, rank_pattern={"v_proj": 3}), "f"
    )
    feeds = bundle.check_adapter(adapter, spec, name="a", field="f")
    assert feeds["model.layers.0.attn.q_proj.lora_A.MatMul.weight"].shape == (IN, 2)
    assert feeds["model.layers.0.attn.v_proj.lora_B.MatMul.weight"].shape == (3, KV)
    assert feeds["model.layers.0.attn.k_proj.lora_B.MatMul.weight"].shape == (0, KV)
    _, qkv = run(tmp_path / "model.onnx", x, feeds)
    expected = x @ weights["wqkv"]
    pq = "base_model.model.model.layers.0.self_attn.q_proj"
    pv = "base_model.model.model.layers.0.self_attn.v_proj"
    expected[:, :Q] += x @ raw[f"{pq}.lora_A.weight"].T @ raw[f"{pq}.lora_B.weight"].T * (4.0 / 2)
    expected[:, Q + KV :] += (
        x @ raw[f"{pv}.lora_A.weight"].T @ raw[f"{pv}.lora_B.weight"].T * (4.0 / 3)
    )
    np.testing.assert_allclose(qkv, expected, rtol=1e-4, atol=1e-4)
    assert bundle.graph_ranks(adapter, spec) == {
        "model.layers.0.attn.q_proj": 2,
        "model.layers.0.attn.k_proj": 0,
        "model.layers.0.attn.v_proj": 3,
    }


def test_no_projection_for_the_targets_is_an_error(tmp_path: Path) -> None:
    base_graph(tmp_path / "base.onnx", np.random.default_rng(0))
    with pytest.raises(RuntimeError, match="no projections"):
        bundle.add_lora_inputs(tmp_path / "base.onnx", tmp_path / "m.onnx", ["up_proj"], SHAPES)


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
    if config.get("peft_type") is None:
        # Merged into the weights instead, the same adapter is fine.
        merged = bundle.read_peft_adapter(path, "spec.source.adapter", runtime=False)
        assert merged.target_modules == ["q_proj"]


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
    # Rank-0 tensors stay out of the file: the graph's rank-0 defaults stand in for them.
    assert set(back) == {A_NAME, B_NAME}
    for name, value in back.items():
        np.testing.assert_array_equal(value, feeds[name])
    bundle.verify_adapter_file(path, spec, adapter.ranks, name="a", field="f")
    with pytest.raises(ExportError, match="expects"):
        bundle.verify_adapter_file(path, spec, {MODULE: 3}, name="a", field="f")


def test_modules_outside_the_decoder_projections_are_refused_up_front(tmp_path: Path) -> None:
    tensors = {
        **peft_tensors(),
        "base_model.model.lm_head.lora_A.weight": np.zeros((2, IN), np.float32),
        "base_model.model.lm_head.lora_B.weight": np.zeros((OUT, 2), np.float32),
    }
    adapter = bundle.read_peft_adapter(write_peft(tmp_path / "a", tensors), "f")
    with pytest.raises(ExportError) as caught:
        bundle.check_runtime_modules(adapter, name="writer", field="spec.adapters[3]")
    err = caught.value
    assert err.field == "spec.adapters[3]" and "'writer'" in err.message
    assert "lm_head" in err.message and "lacks" in err.message
    bundle.check_runtime_modules(
        bundle.read_peft_adapter(write_peft(tmp_path / "b", peft_tensors()), "f"),
        name="b",
        field="f",
    )
