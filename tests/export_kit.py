"""Tiny models for the export tests: a Llama base and LoRA adapters trained on the CPU.

Built once per test session (about 40 s on two busy cores) under pytest's base temp directory.
The adapters are trained with peft directly, differently enough that their greedy outputs
differ from each other and from the base.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "<|user|>\nThe movie was great<|end|>\n<|assistant|>\n"
# Greedy outputs are compared on several prompts: the tiny models are random enough (and the
# BPE merges vary between runs) that one prompt can give the same answer with and without an
# adapter.
PROMPTS = [PROMPT, "The movie", "I think", "<|user|>\nThe hotel", "Honestly the"]


@dataclass(frozen=True)
class ExportKit:
    base: Path  # LlamaForCausalLM, hidden 64, 2 layers
    adapter_a: Path  # r=4 on q/v/o, trained on tone-labelled phrases
    adapter_b: Path  # r=8 on q/k/v/o + mlp, trained on other phrases with another seed
    foreign_base: Path  # hidden 32: a different base model
    foreign_adapter: Path  # trained on foreign_base
    eval_texts: list[str]


def train_lora(
    base: Path,
    out: Path,
    texts: list[str],
    *,
    seed: int,
    r: int,
    targets: list[str],
    steps: int = 30,
    lr: float = 1e-2,
) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = get_peft_model(
        model,
        LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0),
    )
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    batch_size = 8
    for step in range(steps):
        start = (step * batch_size) % max(1, len(texts) - batch_size)
        batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = peft_model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.save_pretrained(str(out))
    return out


def small_llama_like(base: Path, out: Path, *, hidden_size: int, seed: int) -> Path:
    """Another base model: `base`'s tokenizer and vocabulary, a different width."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(str(base))
    config.hidden_size = hidden_size
    config.intermediate_size = 2 * hidden_size
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (base / name).is_file():
            shutil.copy2(base / name, out / name)
    return out


_KITS: dict[Path, ExportKit] = {}


def export_kit(root: Path) -> ExportKit:
    """Build (once per `root`) the base, two adapters and a foreign base with its adapter."""
    root = Path(root)
    if root in _KITS:
        return _KITS[root]
    import torch

    from graft_trainer.testkit import TEMPLATE, build_tiny_llama, tone_records

    # Tiny matrices gain nothing from threads, and threads spin badly on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        kit = _build(root, TEMPLATE, build_tiny_llama, tone_records)
    finally:
        torch.set_num_threads(threads)
    _KITS[root] = kit
    return kit


def _build(root: Path, template: str, build_tiny_llama: Any, tone_records: Any) -> ExportKit:
    records = tone_records(240, seed=0)
    texts = [template.format(**r) for r in records]
    base = build_tiny_llama(root / "base", seed=0)
    adapter_a = train_lora(
        base,
        root / "adapter-a",
        texts[:120],
        seed=1,
        r=4,
        targets=["q_proj", "v_proj", "o_proj"],
        lr=5e-2,
    )
    shouted = [t.upper() for t in texts[120:200]]
    adapter_b = train_lora(
        base,
        root / "adapter-b",
        shouted,
        seed=2,
        r=8,
        targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"],
    )
    foreign_base = small_llama_like(base, root / "foreign-base", hidden_size=32, seed=3)
    foreign_adapter = train_lora(
        foreign_base, root / "foreign-adapter", texts[:40], seed=4, r=4, targets=["q_proj"], steps=2
    )
    return ExportKit(
        base=base,
        adapter_a=adapter_a,
        adapter_b=adapter_b,
        foreign_base=foreign_base,
        foreign_adapter=foreign_adapter,
        eval_texts=texts[200:224],
    )
