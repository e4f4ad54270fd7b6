"""Checks on an exported model: generation, perplexity against PyTorch, decode speed.

Generation and decode speed go through onnxruntime-genai (what serves the model). Perplexity
runs the ONNX graph with onnxruntime directly, one forward pass per text with an empty KV cache,
so that PyTorch and ONNX score exactly the same token ids.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class GenerationResult:
    prompt: str
    output: str
    tokens: list[int]


class GenaiModel:
    """An onnxruntime-genai model with its tokenizer and, optionally, loaded adapters."""

    def __init__(
        self,
        model_dir: Path,
        adapters: Mapping[str, Path] | None = None,
        filename: str | None = None,
    ) -> None:
        """`filename`: serve this graph of `model_dir` instead of genai_config's (base.onnx)."""
        import json

        import onnxruntime_genai as og

        self._og = og
        self.model_dir = Path(model_dir)
        if filename is None:
            self.model = og.Model(str(model_dir))
        else:
            config = og.Config(str(model_dir))
            config.overlay(json.dumps({"model": {"decoder": {"filename": filename}}}))
            self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)
        # A sliding-window model (Gemma 2) runs only with a KV cache at least as long as its
        # window, and og sizes the cache by max_length: a short generation asks for the window's
        # length and stops itself after its tokens.
        try:
            decoder = json.loads((self.model_dir / "genai_config.json").read_text())["model"]
            window = (decoder["decoder"].get("sliding_window") or {}).get("window_size") or 0
            self.min_max_length = min(int(window), int(decoder.get("context_length") or window))
        except (OSError, ValueError, KeyError, TypeError):
            self.min_max_length = 0
        self.adapters: Any = None
        if adapters:
            self.adapters = og.Adapters(self.model)
            for name, path in adapters.items():
                self.adapters.load(str(path), name)

    def _generator(self, max_length: int, min_length: int = 0, adapter: str | None = None) -> Any:
        og = self._og
        params = og.GeneratorParams(self.model)
        max_length = max(max_length, self.min_max_length)
        params.set_search_options(do_sample=False, max_length=max_length, min_length=min_length)
        generator = og.Generator(self.model, params)
        if adapter is not None:
            if self.adapters is None:
                raise ValueError(f"adapter {adapter!r} requested but no adapters are loaded")
            generator.set_active_adapter(self.adapters, adapter)
        return generator

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def generate(
        self, prompt: str, max_new_tokens: int, adapter: str | None = None
    ) -> GenerationResult:
        """Greedy generation of up to `max_new_tokens` tokens after `prompt`."""
        ids = self.encode(prompt)
        generator = self._generator(len(ids) + max_new_tokens, adapter=adapter)
        generator.append_tokens(ids)
        for _ in range(max_new_tokens):
            if generator.is_done():
                break
            generator.generate_next_token()
        tokens = [int(t) for t in generator.get_sequence(0)][len(ids) :][:max_new_tokens]
        return GenerationResult(prompt=prompt, output=self.tokenizer.decode(tokens), tokens=tokens)

    def decode_tokens_per_second(
        self,
        prompt: str,
        new_tokens: int = 64,
        adapter: str | None = None,
        repeats: int = 3,
    ) -> float:
        """Median decode speed (tokens after the first, excluding the prompt's prefill)."""
        ids = self.encode(prompt)
        rates = []
        for _ in range(max(1, repeats)):
            total = len(ids) + new_tokens
            generator = self._generator(total, min_length=total, adapter=adapter)
            generator.append_tokens(ids)
            generator.generate_next_token()  # the first token comes from the prefill pass
            start = time.perf_counter()
            produced = 0
            while produced < new_tokens - 1 and not generator.is_done():
                generator.generate_next_token()
                produced += 1
            elapsed = time.perf_counter() - start
            if produced:
                rates.append(produced / elapsed)
        return statistics.median(rates) if rates else 0.0


# ---------------------------------------------------------------------------------------------
# Perplexity


def tokenize_texts(
    tokenizer_dir: Path, texts: Sequence[str], max_length: int = 512
) -> list[list[int]]:
    """Token ids per text with the Hugging Face tokenizer; texts under two tokens are dropped."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    out = []
    for text in texts:
        ids = [int(t) for t in tokenizer(text, truncation=True, max_length=max_length)["input_ids"]]
        if len(ids) >= 2:
            out.append(ids)
    return out


def _nll(logits: np.ndarray, ids: Sequence[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[1:] given logits[:-1] (float64), and the count."""
    logits = logits.astype(np.float64)[:-1]
    targets = np.asarray(ids[1:])
    peak = logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[:, 0]
    picked = logits[np.arange(len(targets)), targets]
    return float((log_z - picked).sum()), len(targets)


def perplexity_torch(
    model_dir: Path, token_ids: Sequence[Sequence[int]], adapter_dir: Path | None = None
) -> float:
    """Perplexity of the PyTorch model (float32), with an unmerged PEFT adapter if given."""
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for ids in token_ids:
            logits = model(torch.tensor([list(ids)])).logits[0].float().numpy()
            nll, n = _nll(logits, ids)
            total, count = total + nll, count + n
    return math.exp(total / count)


def perplexity_onnx(
    model_dir: Path,
    token_ids: Sequence[Sequence[int]],
    adapter_feeds: Mapping[str, np.ndarray] | None = None,
    device: str = "cpu",
) -> float:
    """Perplexity of the exported graph, feeding adapter tensors as inputs if given."""
    import json

    import onnxruntime as ort

    genai = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]["decoder"]
    options = ort.SessionOptions()
    options.log_severity_level = 3  # adapter inputs with defaults make ORT warn per input
    session = ort.InferenceSession(
        str(Path(model_dir) / genai.get("filename", "model.onnx")),
        options,
        providers=(
            ["CUDAExecutionProvider", "CPUExecutionProvider"]
            if device == "cuda"
            else ["CPUExecutionProvider"]
        ),
    )
    inputs = {i.name: i for i in session.get_inputs()}
    # Adapter inputs have rank-0 initializers as defaults: ORT lists them apart.
    overridable = set(inputs) | {i.name for i in session.get_overridable_initializers()}
    if adapter_feeds and not set(adapter_feeds) <= overridable:
        unknown = sorted(set(adapter_feeds) - overridable)
        raise ValueError(f"the graph has no adapter inputs named {unknown[:3]}")
    kv_type = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    # Sliding-window layers (Gemma 2) keep a window-sized KV cache ("past_sliding_length"):
    # the kernel wants its capacity at least the window even when it holds nothing yet.
    window = int((genai.get("sliding_window") or {}).get("window_size") or 0)
    total, count = 0.0, 0
    for ids in token_ids:
        n = len(ids)
        feeds: dict[str, Any] = {}
        for name, meta in inputs.items():
            if name == "input_ids":
                feeds[name] = np.asarray([ids], dtype=np.int64)
            elif name == "attention_mask":
                feeds[name] = np.ones((1, n), dtype=np.int64)
            elif name == "position_ids":
                feeds[name] = np.arange(n, dtype=np.int64)[None, :]
            elif name.startswith("past_key_values"):
                heads, head_size = genai["num_key_value_heads"], genai["head_size"]
                dtype = kv_type.get(meta.type, np.float32)
                length_dim = meta.shape[2] if len(meta.shape) > 2 else None
                sliding = isinstance(length_dim, str) and "sliding" in length_dim
                length = window if sliding else 0  # empty either way: attention_mask says so
                feeds[name] = np.zeros((1, heads, length, head_size), dtype=dtype)
        if adapter_feeds:
            feeds.update({k: v for k, v in adapter_feeds.items() if k in overridable})
        logits = session.run(["logits"], feeds)[0][0]
        nll, k = _nll(np.asarray(logits, dtype=np.float32), ids)
        total, count = total + nll, count + k
    return math.exp(total / count)


def perplexity_increase(reference: float, candidate: float) -> float:
    """Relative increase of `candidate` over `reference` (0.05 = 5% worse; negative is better)."""
    return (candidate - reference) / reference
