"""SwiGLU MLPs with the SiLU recomputed in the backward pass (graft_trainer.swiglu): the stock
loss and gradients (LoRA and full fine-tuning), fewer saved activations; other models untouched."""

from __future__ import annotations

import copy
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from graft_trainer import swiglu  # noqa: E402
from tests.unit.test_trainer_lm_loss import RTOL, grads, lora, padded_batch, tiny  # noqa: E402


def loss_and_grads(model: Any, inputs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), grads(model)


@pytest.mark.parametrize(
    ("model_type", "method"), [("llama", "lora"), ("qwen2", "lora"), ("llama", "full")]
)
def test_same_loss_and_gradients_as_stock(model_type: str, method: str) -> None:
    stock = tiny(model_type)
    if method == "lora":
        stock = lora(stock, ["q_proj", "gate_proj", "up_proj", "down_proj"])
    ours = copy.deepcopy(stock)
    assert swiglu.enable(ours) == 2  # one MLP per layer
    inputs = padded_batch(6)
    l_stock, g_stock = loss_and_grads(stock, inputs)
    l_ours, g_ours = loss_and_grads(ours, inputs)
    torch.testing.assert_close(l_ours, l_stock, rtol=RTOL, atol=0)
    assert g_stock and set(g_stock) == set(g_ours)
    for name, g in g_stock.items():
        rel = float((g_ours[name] - g).norm() / g.norm().clamp(min=1e-30))
        assert rel <= RTOL, (name, rel)


def test_saves_fewer_activations() -> None:
    def saved(model: Any) -> int:
        storages: dict[int, int] = {}

        def pack(t: Any) -> Any:
            if not isinstance(t, torch.nn.Parameter):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(**padded_batch())
        return sum(storages.values())

    stock = lora(tiny())
    ours = copy.deepcopy(stock)
    swiglu.enable(ours)
    assert saved(ours) < saved(stock)


def test_other_models_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    gelu = tiny()
    gelu.config.hidden_act = "gelu"
    assert swiglu.enable(gelu) == 0
    assert swiglu.enable(tiny("gpt2")) == 0
    monkeypatch.setenv("GRAFT_SWIGLU", "0")
    assert swiglu.enable(tiny()) == 0
