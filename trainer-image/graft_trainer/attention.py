"""Block-diagonal attention for flattened batches that pays no cross-text attention.

A training micro-batch of ragged texts is laid out as one row with no padding (position ids
restart at each text). Stock sdpa then computes attention over the whole row under a
block-diagonal mask, paying for every cross-text pair it masks out. `graft_varlen` instead
runs causal sdpa on each text's block (sequence starts come as `cu_seq_lens_q`, as for
flash-attention's varlen kernels) and falls back to stock sdpa for anything else (evaluation,
generation), so one model serves both.
"""

from __future__ import annotations

import itertools
from typing import Any

NAME = "graft_varlen"
# Architectures whose attention takes the varlen kwargs through to the attention function and
# whose masks come from transformers' create_causal_mask (packed position ids understood).
FLATTEN_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2"}
_registered = False


def varlen_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    starts = kwargs.get("cu_seq_lens_q")
    if starts is None or query.shape[0] != 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = getattr(module, "num_key_value_groups", 1)
    bounds = starts.tolist()
    outputs = []
    for s, e in itertools.pairwise(bounds):
        outputs.append(
            torch.nn.functional.scaled_dot_product_attention(
                query[:, :, s:e],
                key[:, :, s:e],
                value[:, :, s:e],
                dropout_p=dropout if module.training else 0.0,
                is_causal=True,
                scale=scaling,
                enable_gqa=groups > 1,
            )
        )
    out = torch.cat(outputs, dim=2).transpose(1, 2).contiguous()
    return out, None


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


def enable(model: Any) -> bool:
    """Switch a supported model to varlen attention; False when it does not qualify."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    if config.model_type not in FLATTEN_MODEL_TYPES:
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", NAME):
        return False
    register()
    base.set_attn_implementation(NAME)
    return True
