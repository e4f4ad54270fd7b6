"""The causal-LM loss computed only where it counts: the LM head at target positions, in chunks.

The stock forward of a ...ForCausalLM projects every position of the batch through the LM head
(batch x length x vocabulary logits, then an fp32 copy of them for the loss) although only the
positions whose next token carries a label (labels != -100) add to the loss. With completion-only
labels that is a small share of the positions, and with a 50k-150k vocabulary the head is a
large share of the model's work and most of its activation memory.

`causal_lm_loss` runs the model's body (the decoder without its head), gathers the hidden states
at the target positions and applies the head and the cross-entropy to them in chunks of
`chunk_rows(vocab)` rows: the logits of one chunk (O(chunk x vocab)) exist at a time, never the
whole batch's. The chunk's gradient is taken in the same pass (softmax minus one-hot, times the
head's weight), so nothing is recomputed in the backward pass and no logits are kept for it.
The loss and gradients are the stock ones (the mean over target tokens, same dtypes under
autocast); tests compare them.

Models it cannot wrap keep the stock forward (`head_parts` returns None): architectures outside
a known list, heads that scale or soft-cap their logits, a head that is not a plain Linear (a
LoRA-wrapped or trained-copy lm_head), or GRAFT_TARGET_LOSS=0.
"""

from __future__ import annotations

import os
from typing import Any

# Decoder-only models whose ForCausalLM forward is `lm_head(model(...).last_hidden_state)` and
# the mean cross-entropy of the shifted labels, nothing else.
MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2", "gemma", "phi3"}
# Config fields of heads that transform their logits (soft-capping, scaling): stock forward.
LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "lm_head_multiplier",
    "output_multiplier",
)
# Logit elements per chunk: 2**24 fp32 is 64 MiB (a 151,936 vocabulary gives 110 rows).
CHUNK_ELEMENTS = 1 << 24


def chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(vocab, 1))


def head_parts(model: Any) -> tuple[Any, Any] | None:
    """(body, lm_head) of a model the target-position loss applies to, else None."""
    import torch

    if os.environ.get("GRAFT_TARGET_LOSS", "1") == "0":
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or getattr(config, "model_type", None) not in MODEL_TYPES:
        return None
    if any(getattr(config, f, None) is not None for f in LOGIT_TRANSFORMS):
        return None
    body = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if body is None or body is base or type(head) is not torch.nn.Linear:
        return None
    return body, head


def causal_lm_loss(model: Any, inputs: dict[str, Any]) -> Any:
    """The mean next-token cross-entropy over target positions (what `model(**inputs).loss`
    is), through the target-position head where the model allows it."""
    parts = head_parts(model)
    if parts is None:
        return model(**inputs).loss
    body, head = parts
    labels = inputs["labels"]
    hidden = body(**{k: v for k, v in inputs.items() if k != "labels"}).last_hidden_state
    shifted = labels[:, 1:].to(hidden.device)
    mask = shifted != -100
    rows = hidden[:, :-1][mask]
    targets = shifted[mask]
    count = int(targets.numel())
    if count == 0:  # stock gives nan (0/0); a zero that keeps the graph connected
        return hidden.sum() * 0.0
    return head_cross_entropy(rows, head.weight, head.bias, targets) / count


def _compute_dtype(device: Any, dtype: Any) -> Any:
    import torch

    kind = device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return dtype


def head_cross_entropy(rows: Any, weight: Any, bias: Any, targets: Any) -> Any:
    """Sum over rows of cross_entropy(rows @ weight.T + bias, targets), chunked; differentiable
    in rows, weight and bias."""
    import torch

    track = torch.is_grad_enabled() and (
        rows.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if not track:
        total, _, _, _ = _chunks(rows, weight, bias, targets, False, False, False)
        return total
    return _HeadCrossEntropy.apply(rows, weight, bias, targets)


def _chunks(
    rows: Any, weight: Any, bias: Any, targets: Any, want_rows: bool, want_w: bool, want_b: bool
) -> tuple[Any, Any, Any, Any]:
    """The summed loss and, as asked, its gradients in rows, weight and bias."""
    import torch

    cd = _compute_dtype(rows.device, rows.dtype)
    with torch.autocast(rows.device.type, enabled=False):
        w = weight.to(cd)
        b = bias.to(cd) if bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        g_rows = torch.empty_like(rows) if want_rows else None
        g_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        )
        g_b = (
            torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
            if want_b
            else None
        )
        step = chunk_rows(weight.shape[0])
        for s in range(0, rows.shape[0], step):
            h = rows[s : s + step].to(cd)
            y = targets[s : s + step]
            logits = h @ w.t() if b is None else torch.addmm(b, h, w.t())
            logits = logits.float()  # as the stock loss upcasts
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if not (want_rows or want_w or want_b):
                continue
            # d(sum of losses)/d(logits) = softmax - one_hot, built in place of the logits
            grad = logits.sub_(lse[:, None]).exp_()
            grad[torch.arange(grad.shape[0], device=grad.device), y] -= 1.0
            g = grad.to(cd)
            if want_rows:
                assert g_rows is not None
                g_rows[s : s + step] = (g @ w).to(rows.dtype)
            if want_w:
                assert g_w is not None
                g_w += (g.t() @ h).float()
            if want_b:
                assert g_b is not None
                g_b += grad.sum(0)
    return total, g_rows, g_w, g_b


def _function() -> Any:
    import torch

    class HeadCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, rows: Any, weight: Any, bias: Any, targets: Any) -> Any:
            want_b = bias is not None and ctx.needs_input_grad[2]
            total, g_rows, g_w, g_b = _chunks(
                rows,
                weight,
                bias,
                targets,
                ctx.needs_input_grad[0],
                ctx.needs_input_grad[1],
                want_b,
            )
            ctx.grads = (g_rows, g_w, g_b)
            ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
            return total

        @staticmethod
        def backward(ctx: Any, grad_out: Any) -> Any:
            g_rows, g_w, g_b = ctx.grads
            ctx.grads = None
            w_dtype, b_dtype = ctx.dtypes
            return (
                g_rows * grad_out.to(g_rows.dtype) if g_rows is not None else None,
                (g_w * grad_out).to(w_dtype) if g_w is not None else None,
                (g_b * grad_out).to(b_dtype) if g_b is not None else None,
                None,
            )

    return HeadCrossEntropy


class _Lazy:
    """torch is imported when the function is first used (this module loads without it)."""

    fn: Any = None

    def apply(self, *args: Any) -> Any:
        if self.fn is None:
            self.fn = _function()
        return self.fn.apply(*args)


_HeadCrossEntropy = _Lazy()


def loss_module(model: Any) -> Any:
    """A torch Module whose forward(inputs) is `causal_lm_loss(model, inputs)`: what data
    parallelism wraps, so that DDP sees the forward that runs."""
    import torch

    class LossModule(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, inputs: dict[str, Any]) -> Any:
            return causal_lm_loss(self.inner, inputs)

    return LossModule(model)
