"""Fold a PEFT LoRA adapter into its base model's weights (`adapterMode: merge`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from graft_trainer.export.errors import ExportError

# Tokenizer and generation files the builder copies into the ONNX directory.
_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)


def read_adapter_config(adapter_dir: Path, field: str) -> dict[str, Any]:
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(
            field, f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)"
        ) from None
    except json.JSONDecodeError as exc:
        raise ExportError(
            field, f"adapter_config.json of {adapter_dir} is not JSON: {exc}"
        ) from None
    if not isinstance(config, dict):
        raise ExportError(field, f"adapter_config.json of {adapter_dir} is not an object")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ExportError(field, f"only LoRA adapters can be exported; this one is {peft_type}")
    return config


def merge_adapter(model_dir: Path, adapter_dir: Path, out_dir: Path, field: str) -> Path:
    """Write base + adapter, merged, as a float32 Hugging Face directory; returns `out_dir`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    read_adapter_config(adapter_dir, field)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    try:
        peft_model = PeftModel.from_pretrained(model, adapter_dir)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ExportError(
            field, f"adapter does not fit the base model {model_dir}: {exc}", "AdapterMismatch"
        ) from None
    merged = peft_model.merge_and_unload()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir)
    for name in _SIDE_FILES:
        source = Path(model_dir) / name
        if source.is_file() and not (out_dir / name).exists():
            shutil.copy2(source, out_dir / name)
    return out_dir
