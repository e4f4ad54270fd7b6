"""The target-position LM head (graft_trainer.lm_loss) gives the stock loss and gradients: LoRA
and full fine-tuning, tied and untied embeddings, padded and flattened batches, evaluation (no
grad), chunks smaller than the batch; models it cannot wrap keep the stock forward."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from graft_trainer import attention, lm_loss  # noqa: E402

VOCAB = 301
RTOL = 1e-5


def tiny(model_type: str = "llama", tied: bool = False, seed: int = 0) -> Any:
    extra: dict[str, Any] = {}
    if model_type != "gpt2":
        extra = {"intermediate_size": 64, "num_key_value_heads": 2, "head_dim": 8}
    config = transformers.AutoConfig.for_model(
        model_type,
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        **extra,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def lora(model: Any, targets: list[str] | None = None) -> Any:
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=targets or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"],
            task_type="CAUSAL_LM",
        ),
    )
    # B starts at zero: give it values so that the gradients reach every adapter matrix
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def padded_batch(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    lengths = [17, 9, 23]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    labels = torch.full((len(lengths), width), -100)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, :n] = 1
        prompt = n // 2  # completion-only: labels on the second half
        labels[i, prompt:n] = ids[i, prompt:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "use_cache": False}


def flat_batch(seed: int = 0) -> dict[str, Any]:
    from graft_trainer.data import Example, collate_flat

    g = torch.Generator().manual_seed(seed)
    examples = []
    for n in (17, 9, 23):
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        examples.append(Example(ids, [-100] * (n // 2) + ids[n // 2 :]))
    return collate_flat(examples).tensors("cpu")


def grads(model: Any) -> dict[str, Any]:
    return {
        n: p.grad.detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }


def compare(model: Any, inputs: dict[str, Any]) -> tuple[float, float]:
    """Loss and gradients, stock then lm_loss; asserts they agree. Returns both losses."""
    model.zero_grad(set_to_none=True)
    stock = model(**inputs).loss
    stock.backward()
    g_stock = grads(model)
    model.zero_grad(set_to_none=True)
    ours = lm_loss.causal_lm_loss(model, inputs)
    ours.backward()
    g_ours = grads(model)
    assert g_stock, "no gradients to compare"
    assert set(g_stock) == set(g_ours)
    torch.testing.assert_close(ours.detach(), stock.detach(), rtol=RTOL, atol=0)
    for name, g in g_stock.items():
        # relative to the gradient's norm: single elements near zero differ in float rounding
        rel = float((g_ours[name] - g).norm() / g.norm().clamp(min=1e-30))
        assert rel <= RTOL, (name, rel)
    return float(stock.detach()), float(ours.detach())


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # 5 rows per chunk: every batch here spans several chunks
    monkeypatch.setattr(lm_loss, "CHUNK_ELEMENTS", 5 * VOCAB)


@pytest.mark.parametrize("tied", [False, True])
def test_lora_loss_and_gradients_match_stock(tied: bool) -> None:
    model = lora(tiny(tied=tied))
    assert lm_loss.head_parts(model) is not None
    compare(model, padded_batch())


@pytest.mark.parametrize("tied", [False, True])
def test_full_fine_tuning_loss_and_gradients_match_stock(tied: bool) -> None:
    model = tiny(tied=tied)
    assert lm_loss.head_parts(model) is not None
    compare(model, padded_batch(1))
    # the head's (and with tied embeddings the embedding's) gradient was compared
    assert model.get_output_embeddings().weight.grad is not None


@pytest.mark.parametrize("model_type", ["qwen2", "mistral"])
def test_other_architectures_match_stock(model_type: str) -> None:
    compare(lora(tiny(model_type, tied=model_type == "qwen2")), padded_batch(2))


def test_flattened_batch_with_varlen_attention_matches_stock() -> None:
    model = lora(tiny())
    assert attention.enable(model)
    compare(model, flat_batch())


def test_evaluation_loss_matches_stock_without_grad() -> None:
    model = lora(tiny(tied=True))
    model.eval()
    inputs = padded_batch(3)
    with torch.no_grad():
        stock = model(**inputs).loss
        ours = lm_loss.causal_lm_loss(model, inputs)
    assert not ours.requires_grad
    torch.testing.assert_close(ours, stock, rtol=RTOL, atol=0)


def test_evaluator_eval_loss_matches_stock(monkeypatch: pytest.MonkeyPatch) -> None:
    from graft_trainer.data import Example
    from graft_trainer.evaluation import eval_loss

    model = lora(tiny())
    g = torch.Generator().manual_seed(4)
    examples = []
    for n in (5, 12, 8, 30):
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        examples.append(Example(ids, [-100] * 3 + ids[3:]))
    ours = eval_loss(model, examples, 3, 0, "cpu", None)
    monkeypatch.setenv("GRAFT_TARGET_LOSS", "0")
    stock = eval_loss(model, examples, 3, 0, "cpu", None)
    assert ours == pytest.approx(stock, rel=RTOL)


def test_autocast_bf16_matches_stock_closely() -> None:
    model = lora(tiny())
    inputs = padded_batch(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock = model(**inputs).loss
        ours = lm_loss.causal_lm_loss(model, inputs)
    torch.testing.assert_close(ours.float(), stock.float(), rtol=2e-3, atol=0)


def test_no_target_gives_a_differentiable_zero() -> None:
    model = lora(tiny())
    inputs = padded_batch()
    inputs["labels"] = torch.full_like(inputs["labels"], -100)
    loss = lm_loss.causal_lm_loss(model, inputs)
    assert float(loss) == 0.0
    loss.backward()


def test_chunk_rows_bound_the_logits() -> None:
    assert lm_loss.chunk_rows(VOCAB) == 5
    assert lm_loss.chunk_rows(10**9) == 1


def test_fallback_to_stock_for_models_it_cannot_wrap(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def spy(model: Any) -> None:
        orig = model.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            return orig(*args, **kwargs)

        model.forward = forward

    # an architecture outside the list (GPT-2): its own forward runs, same loss
    gpt2 = tiny("gpt2").eval()  # no dropout: two forwards give the same loss
    assert lm_loss.head_parts(gpt2) is None
    spy(gpt2)
    inputs = padded_batch()
    loss = lm_loss.causal_lm_loss(gpt2, inputs)
    assert calls == [1]
    torch.testing.assert_close(loss, gpt2(**inputs).loss)
    # a LoRA on the LM head itself: the head is no plain Linear
    assert lm_loss.head_parts(lora(tiny(), ["q_proj", "lm_head"])) is None
    # a head that soft-caps its logits
    capped = tiny()
    capped.config.final_logit_softcapping = 30.0
    assert lm_loss.head_parts(capped) is None
    # switched off
    monkeypatch.setenv("GRAFT_TARGET_LOSS", "0")
    assert lm_loss.head_parts(tiny()) is None


def test_loss_module_is_the_loss() -> None:
    model = lora(tiny())
    inputs = padded_batch()
    module = lm_loss.loss_module(model)
    assert {id(p) for p in module.parameters()} == {id(p) for p in model.parameters()}
    torch.testing.assert_close(module(inputs), model(**inputs).loss, rtol=RTOL, atol=0)
