"""A token budget per forward/backward (graft_trainer.memory): a micro-batch cut into pieces of
whole texts (flattened) or whole rows (padded), each piece's mean loss weighted by its target
tokens, gives the loss and gradients of the whole micro-batch; the budget's defaults; glibc's
mmap threshold set on the CPU only."""

from __future__ import annotations

import ctypes.util
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from graft_trainer import attention, lm_loss, memory  # noqa: E402
from graft_trainer.data import Batch, Example, collate_flat, collate_padded  # noqa: E402
from graft_trainer.errors import GraftInputError  # noqa: E402
from tests.unit.test_trainer_lm_loss import RTOL, VOCAB, grads, lora, tiny  # noqa: E402

LENGTHS = (17, 9, 23, 5, 30)


def examples(seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in LENGTHS:
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        out.append(Example(ids, [-100] * (n // 2) + ids[n // 2 :]))
    return out


def test_flat_pieces_are_whole_texts_within_the_budget() -> None:
    batch = collate_flat(examples())
    pieces = memory.split_batch(batch, 32)
    # 17+9 fit in 32, 23+5 do, 30 alone
    assert [p.seq_starts for p in pieces] == [[0, 17, 26], [0, 23, 28], [0, 30]]
    assert sum(p.tokens for p in pieces) == batch.tokens
    assert sum(p.target_tokens for p in pieces) == batch.target_tokens
    assert [x for p in pieces for x in p.input_ids[0]] == batch.input_ids[0]
    assert [x for p in pieces for x in p.labels[0]] == batch.labels[0]
    assert batch.position_ids is not None
    assert [x for p in pieces for x in (p.position_ids or [[]])[0]] == batch.position_ids[0]
    # a text longer than the budget is a piece of its own; no budget or a fitting batch: whole
    assert [p.tokens for p in memory.split_batch(batch, 10)] == list(LENGTHS)
    assert memory.split_batch(batch, 0) == [batch]
    assert memory.split_batch(batch, sum(LENGTHS)) == [batch]


def test_padded_pieces_are_whole_rows() -> None:
    batch = collate_padded(examples(), pad_id=0)
    pieces = memory.split_batch(batch, 2 * 30)  # width 30: two rows a piece
    assert [len(p.input_ids) for p in pieces] == [2, 2, 1]
    assert sum(p.tokens for p in pieces) == batch.tokens == sum(LENGTHS)
    assert sum(p.target_tokens for p in pieces) == batch.target_tokens


def weighted_loss_and_grads(model: Any, pieces: list[Batch], targets: int) -> tuple[float, Any]:
    """What the engine's step does with the pieces of one micro-batch."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for p in pieces:
        loss = lm_loss.causal_lm_loss(model, p.tensors("cpu")) * (p.target_tokens / targets)
        loss.backward()
        total += float(loss.detach())
    return total, grads(model)


@pytest.mark.parametrize("layout", ["flat", "padded"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_pieces_give_the_gradients_of_the_whole_batch(layout: str, method: str) -> None:
    model = tiny(tied=method == "full")
    if method == "lora":
        model = lora(model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
    if layout == "flat":
        assert attention.enable(model)
        batch, budget = collate_flat(examples(1)), 32
    else:
        batch, budget = collate_padded(examples(1), pad_id=0), 60
    pieces = memory.split_batch(batch, budget)
    assert len(pieces) == 3
    whole_loss, whole = weighted_loss_and_grads(model, [batch], batch.target_tokens)
    split_loss, split = weighted_loss_and_grads(model, pieces, batch.target_tokens)
    assert abs(split_loss - whole_loss) <= RTOL * abs(whole_loss)
    assert whole and set(whole) == set(split)
    for name, g in whole.items():
        rel = float((split[name] - g).norm() / g.norm().clamp(min=1e-30))
        assert rel <= RTOL, (name, rel)


def test_budget_defaults_to_the_cpu_and_to_the_models_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    monkeypatch.delenv("GRAFT_TOKEN_BUDGET", raising=False)
    assert memory.token_budget("cpu") == memory.DEFAULT_CPU_BUDGET
    assert memory.token_budget("cuda") == 0
    smollm = SimpleNamespace(hidden_size=576, num_hidden_layers=30, intermediate_size=1536)
    tiny = SimpleNamespace(hidden_size=64, num_hidden_layers=2, intermediate_size=128)
    assert 180 <= memory.token_budget("cpu", smollm) <= 200
    assert memory.token_budget("cpu", tiny) > 10_000  # a small model's batches stay whole
    assert memory.token_budget("cuda", smollm) == 0
    monkeypatch.setenv("GRAFT_TOKEN_BUDGET", "0")
    assert memory.token_budget("cpu", smollm) == 0
    monkeypatch.setenv("GRAFT_TOKEN_BUDGET", "512")
    assert memory.token_budget("cuda") == 512
    for bad in ("-1", "many", "2.5"):
        monkeypatch.setenv("GRAFT_TOKEN_BUDGET", bad)
        with pytest.raises(GraftInputError) as refused:
            memory.token_budget("cpu", smollm)
        assert str(refused.value).startswith(f"GRAFT_TOKEN_BUDGET='{bad}': expected a whole")
    batch = collate_flat(examples())
    assert memory.split_batch(batch, 512) == [batch]  # 84 tokens fit in 512
    assert len(memory.split_batch(batch, 32)) == 3


def test_mmap_threshold_is_set_on_the_cpu_only_when_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GRAFT_MALLOC_TUNE", raising=False)
    assert memory.release_freed_memory("cpu") is False  # opt-in: it costs speed
    monkeypatch.setenv("GRAFT_MALLOC_TUNE", "1")
    assert memory.release_freed_memory("cuda") is False
    libc = ctypes.util.find_library("c")
    if libc is None or not hasattr(ctypes.CDLL(libc), "mallopt"):
        pytest.skip("no glibc mallopt here")
    assert memory.release_freed_memory("cpu") is True
