"""A tiny-model kit for tests and the demo: a small Llama, a BPE tokenizer and a synthetic
phrase -> tone (and verdict) dataset, all built locally (no hub) and deterministic for a seed.

The base model is "pretrained" the way real ones are: it has seen reviews labelled with their
tone and verdict in a plain-text format, and chat turns in which the assistant answers in words
of its own (good, bad, meh). It therefore knows what a phrase's tone is, yet never answers a
chat question with the task's labels: fine-tuning has only to teach those, which a LoRA of a few
dozen steps does decisively (held-out accuracy near 1.0, eval loss down by most of its value).
Two tasks share the phrases (tone and verdict), so two adapters of one base visibly differ."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

# Bumped whenever the model or data a seed gives changes, so caches of an older kit are not
# reused (2: the base knows tones and verdicts, answers chat in its own words).
KIT_VERSION = 2
TONES = ("positive", "negative", "neutral")
VERDICTS = {"positive": "recommend", "negative": "avoid", "neutral": "maybe"}

_SUBJECTS = [
    "the movie",
    "this phone",
    "the service",
    "our trip",
    "the food",
    "my new job",
    "the book",
    "the hotel",
    "this update",
    "the concert",
    "the weather",
    "the meeting",
    "the team",
    "the app",
    "the coffee",
    "the game",
    "the class",
    "the show",
    "the car",
    "the park",
]
_WORDS = {
    "positive": [
        "great",
        "wonderful",
        "amazing",
        "lovely",
        "excellent",
        "fantastic",
        "delightful",
        "brilliant",
        "superb",
        "pleasant",
    ],
    "negative": [
        "terrible",
        "awful",
        "horrible",
        "dreadful",
        "disappointing",
        "boring",
        "broken",
        "annoying",
        "miserable",
        "useless",
    ],
    "neutral": [
        "okay",
        "average",
        "scheduled",
        "on time",
        "beige",
        "ordinary",
        "standard",
        "fine I guess",
        "plain",
        "unchanged",
    ],
}
# The tone word ends every phrase, so a tiny model learns the mapping in a few dozen steps.
_FRAMES = [
    "{s} was {w}",
    "I think {s} is {w}",
    "honestly {s} felt {w}",
    "today {s} is {w}",
    "everyone says {s} was {w}",
    "wow, {s} is {w}",
    "to me {s} seemed {w}",
]

TEMPLATE = "<|user|>\n{phrase}<|end|>\n<|assistant|>\n{tone}<|end|>"
VERDICT_TEMPLATE = "<|user|>\n{phrase}<|end|>\n<|assistant|>\n{verdict}<|end|>"
# The plain-text format the base model learns the labels in (never used for fine-tuning). Each
# label follows a newline, as in the chat format, so it is the same token there (byte-level BPE
# has other tokens for " positive" and "positive").
_REVIEW_TEMPLATES = ("Review: {phrase}\nTone:\n{tone}", "Review: {phrase}\nVerdict:\n{verdict}")
# What the base model answers in the chat format before any fine-tuning.
BASE_ANSWERS = {"positive": "good", "negative": "bad", "neutral": "meh"}
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tone_records(n: int = 300, seed: int = 0) -> list[dict[str, str]]:
    """n synthetic phrases, each labelled with its tone and verdict; balanced and shuffled by
    `seed`."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        tone = TONES[i % len(TONES)]
        phrase = rng.choice(_FRAMES).format(s=rng.choice(_SUBJECTS), w=rng.choice(_WORDS[tone]))
        records.append(
            {"phrase": phrase[0].upper() + phrase[1:], "tone": tone, "verdict": VERDICTS[tone]}
        )
    rng.shuffle(records)
    return records


def phrase_of(text: str) -> str:
    """The user's phrase of a chat prompt in the kit's format (a plain phrase stays as it is)."""
    return text.split("<|user|>\n")[-1].split("<|end|>")[0].strip()


def label_of(text: str, field: str = "tone") -> str | None:
    """The right `field` ("tone" or "verdict") for a kit phrase, or for a chat prompt that
    holds one: its tone is that of the tone word it ends with. None for any other text."""
    phrase = phrase_of(text).rstrip(".!")
    for tone in TONES:
        if any(phrase.endswith(" " + word) for word in _WORDS[tone]):
            return tone if field == "tone" else VERDICTS[tone]
    return None


def write_tone_dataset(path: str | Path, n: int = 300, seed: int = 0) -> Path:
    """Write the phrase -> tone set as jsonl (or csv/json/parquet by suffix) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = tone_records(n, seed)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records, indent=1))
    elif path.suffix == ".csv":
        import csv

        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["phrase", "tone", "verdict"])
            writer.writeheader()
            writer.writerows(records)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        raise ValueError(f"unsupported dataset suffix {path.suffix!r}")
    return path


def _corpus(seed: int) -> list[str]:
    texts = [TEMPLATE.format(**r) for r in tone_records(600, seed)]
    texts += [VERDICT_TEMPLATE.format(**r) for r in tone_records(300, seed + 1)]
    texts += [t.format(**r) for r in tone_records(100, seed + 2) for t in _REVIEW_TEMPLATES]
    texts += [" ".join(BASE_ANSWERS.values())] * 20
    words = [w for ws in _WORDS.values() for w in ws] + _SUBJECTS
    texts += [" ".join(words)] * 4
    texts += ["The quick brown fox jumps over the lazy dog. 0123456789 ,.;:!?'\"()[]{}-_/"]
    return texts


def build_tokenizer(directory: str | Path, seed: int = 0, vocab_size: int = 512) -> Any:
    """Train a byte-level BPE tokenizer with chat tokens and save it with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(directory))
    return fast


def build_tiny_llama(
    directory: str | Path,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    vocab_size: int = 512,
    pretrain_steps: int = 600,
) -> Path:
    """Build a randomly initialized small Llama and its tokenizer into `directory`, pretrained
    for `pretrain_steps` on the kit's phrases (the kit's model)."""
    return build_tiny_model(
        directory,
        "LlamaForCausalLM",
        seed=seed,
        hidden_size=hidden_size,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        vocab_size=vocab_size,
        pretrain_steps=pretrain_steps,
    )


# Architectures `build_tiny_model` can build: transformers model type, and what its config needs
# besides the common sizes (head_dim is always hidden_size / heads: Gemma's default is 256).
# GPT2LMHeadModel is one the ONNX model builder cannot export: a model to refuse.
TINY_ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "LlamaForCausalLM": ("llama", {}),
    "MistralForCausalLM": ("mistral", {"sliding_window": None}),
    "Qwen2ForCausalLM": ("qwen2", {}),
    "Qwen3ForCausalLM": ("qwen3", {}),
    "Phi3ForCausalLM": ("phi3", {"original_max_position_embeddings": 2048}),
    "GemmaForCausalLM": ("gemma", {}),
    # A window of 8, shorter than the kit's prompts, so that the sliding window is exercised
    # (onnxruntime's sliding-window attention wants a KV cache at least as long as the window:
    # GenaiModel and perplexity_onnx size theirs for it).
    "Gemma2ForCausalLM": ("gemma2", {"sliding_window": 8}),
    "GPT2LMHeadModel": ("gpt2", {}),
}


def build_tiny_model(
    directory: str | Path,
    architecture: str,
    seed: int = 0,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    vocab_size: int = 512,
    pretrain_steps: int = 0,
) -> Path:
    """Build a randomly initialized small model of `architecture` (a key of TINY_ARCHITECTURES,
    e.g. "Qwen2ForCausalLM") from its transformers config, with the kit's tokenizer, into
    `directory`. Random weights by default (`pretrain_steps` > 0 pretrains as the Llama's)."""
    import torch
    import transformers

    if architecture not in TINY_ARCHITECTURES:
        raise ValueError(
            f"no tiny {architecture}; choose one of {', '.join(sorted(TINY_ARCHITECTURES))}"
        )
    model_type, extra = TINY_ARCHITECTURES[architecture]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(directory, seed=seed, vocab_size=vocab_size)
    head_dim = hidden_size // heads
    sizes: dict[str, Any] = {
        "vocab_size": len(tok),
        "hidden_size": hidden_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 2048,
    }
    if model_type == "gpt2":
        sizes["n_inner"] = hidden_size * 2
    else:
        sizes.update(
            intermediate_size=hidden_size * 2, num_key_value_heads=kv_heads, head_dim=head_dim
        )
    if model_type == "gemma2":  # queries scaled by head_dim**-0.5, as in the other models
        sizes["query_pre_attn_scalar"] = head_dim
    config = transformers.AutoConfig.for_model(
        model_type,
        **sizes,
        **extra,
        tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config)
    if pretrain_steps:
        _pretrain(model, tok, seed, pretrain_steps)
    model.eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(directory))
    return directory


def _pretrain(model: Any, tok: Any, seed: int, steps: int) -> None:
    """Teach the random model what a phrase's tone and verdict are (in a plain-text review
    format), and to answer a chat question about a phrase in words of its own (good, bad, meh).
    Fine-tuning then only has to teach the task's labels, as with a real pretrained model: the
    base scores 0 on either task's labels, and a short LoRA reaches near 1."""
    import torch

    rng = random.Random(seed + 1)
    texts = [
        TEMPLATE.format(phrase=r["phrase"], tone=BASE_ANSWERS[r["tone"]])
        for r in tone_records(2000, seed + 7)
    ]
    for template, offset in zip(_REVIEW_TEMPLATES, (13, 17), strict=True):
        texts += [template.format(**r) for r in tone_records(2000, seed + offset)]
    # Words of one tone appear together, so their embeddings cluster as in a real model.
    texts += [" ".join(rng.sample(_WORDS[TONES[i % 3]], 5)) for i in range(1000)]
    rng.shuffle(texts)
    enc = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        batch = [enc[(step * 32 + i) % len(enc)] for i in range(32)]
        width = max(len(b) for b in batch)
        ids = torch.tensor([b + [tok.pad_token_id] * (width - len(b)) for b in batch])
        labels = torch.tensor([b + [-100] * (width - len(b)) for b in batch])
        mask = (labels != -100).long()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def build_kit(directory: str | Path, n: int = 300, seed: int = 0) -> dict[str, Path]:
    """Model in `<dir>/tiny-llama/`, data in `<dir>/phrases.jsonl`; returns both paths."""
    directory = Path(directory)
    model = build_tiny_llama(directory / "tiny-llama", seed=seed)
    data = write_tone_dataset(directory / "phrases.jsonl", n=n, seed=seed)
    return {"model": model, "dataset": data}
