"""Host memory of a training step: a token budget per forward/backward, and glibc's cache.

A step's peak memory is the activations autograd keeps for the backward pass of its largest
forward, and they grow with the tokens of that forward. `split_batch` cuts a micro-batch into
pieces of at most `token_budget` tokens — whole texts of a flattened row (attention never
crosses a text, so each text's loss and gradients do not depend on its neighbours), whole rows
of a padded or packed batch — and the engine runs forward and backward piece by piece, each
piece's mean loss weighted by its target tokens over the step's, which is the gradient of the
whole micro-batch (tests compare them). A text longer than the budget is a piece of its own.
The default budget applies on the CPU only (`DEFAULT_CPU_BUDGET` tokens): there the matrix
products of a few hundred rows already run at the machine's rate, while a GPU wants the whole
micro-batch; GRAFT_TOKEN_BUDGET=N sets it (0: whole micro-batches) on any device.

glibc's malloc keeps freed memory for reuse: allocations under its mmap threshold come from a
heap that is returned to the system only from its top, so a step's short-lived activations of
varying sizes leave the heap (and the process's peak RSS) at two to three times the memory live
at any moment. `release_freed_memory` sets the threshold low (`MMAP_THRESHOLD` bytes; glibc
would raise it up to 32 MiB as tensors are freed), so tensors get pages of their own that go
back to the system when they are freed. CPU runs only, opt-in (GRAFT_MALLOC_TUNE=1): it makes
every activation fault in fresh pages (about half the speed with two threads). The trainer's
commands run under tcmalloc where it is installed (graft_trainer.allocator), which keeps the peak
as low at full speed; this lever is for where it is not.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import os
from typing import Any

from graft_trainer.data import Batch, target_count
from graft_trainer.errors import GraftInputError

DEFAULT_CPU_BUDGET = 256  # tokens, when the model's config says nothing of its size
MIN_CPU_BUDGET = 64
# The activations one forward/backward may keep on the CPU, as activation_bytes_per_token
# estimates them (about half of what is measured): about 190 tokens of the SmolLM2-135M shape,
# 390 of the 6-layer Qwen2.5-0.5B one. Measured under tcmalloc (bench/README.md): the Qwen
# shape's peak RSS 1881 -> 1785 MiB from 384 MiB (590 tokens); SmolLM's speed unchanged.
ACTIVATION_BUDGET_BYTES = 256 * 2**20
MMAP_THRESHOLD = 256 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt parameter numbers (malloc.h)


def token_budget(device_type: str, config: Any = None) -> int:
    """Tokens per forward/backward; 0 means whole micro-batches. On the CPU, with the model's
    `config`, as many tokens as keep the activations of one piece near ACTIVATION_BUDGET_BYTES
    (a small model's micro-batches stay whole: cutting them would only add per-op overhead)."""
    env = os.environ.get("GRAFT_TOKEN_BUDGET")
    if env is not None and env.strip():
        if not env.strip().isdigit():
            raise GraftInputError(
                f"GRAFT_TOKEN_BUDGET={env!r}: expected a whole number of tokens "
                "(0: whole micro-batches)"
            )
        return int(env)
    if device_type != "cpu":
        return 0
    per_token = activation_bytes_per_token(config) if config is not None else 0
    if not per_token:
        return DEFAULT_CPU_BUDGET
    return max(MIN_CPU_BUDGET, ACTIVATION_BUDGET_BYTES // per_token)


def activation_bytes_per_token(config: Any) -> int:
    """A rough fp32 estimate of what a decoder keeps per token for the backward pass (a dozen
    hidden-sized and a few intermediate-sized tensors per layer); 0 when the config does not
    say. On the SmolLM2-135M shape it is 1.4 MB, against about 2.7 MB measured."""
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    inter = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    return 4 * layers * (10 * hidden + 4 * inter)


def split_batch(batch: Batch, budget: int) -> list[Batch]:
    """The micro-batch as pieces of at most `budget` tokens (whole texts of a flattened row,
    whole rows otherwise; a single text or row may exceed it); [batch] when it fits."""
    if budget <= 0:
        return [batch]
    if batch.seq_starts is not None:
        return _split_flat(batch, budget)
    width = max(len(r) for r in batch.input_ids)
    per = max(1, budget // max(width, 1))
    if per >= len(batch.input_ids):
        return [batch]
    return [_rows(batch, i, i + per) for i in range(0, len(batch.input_ids), per)]


def _split_flat(batch: Batch, budget: int) -> list[Batch]:
    starts = batch.seq_starts
    assert starts is not None and len(batch.input_ids) == 1
    if starts[-1] - starts[0] <= budget:
        return [batch]
    groups: list[list[int]] = []  # the text boundaries of each piece
    for s, e in itertools.pairwise(starts):
        if groups and e - groups[-1][0] <= budget:
            groups[-1].append(e)
        else:
            groups.append([s, e])
    return [_span(batch, g) for g in groups]


def _span(batch: Batch, bounds: list[int]) -> Batch:
    s, e = bounds[0], bounds[-1]
    labels = batch.labels[0][s:e]
    positions = batch.position_ids[0][s:e] if batch.position_ids is not None else None
    return Batch(
        [batch.input_ids[0][s:e]],
        [labels],
        position_ids=[positions] if positions is not None else None,
        tokens=e - s,
        target_tokens=target_count(labels),  # each text's first label is -100
        seq_starts=[b - s for b in bounds],
    )


def _rows(batch: Batch, i: int, j: int) -> Batch:
    labels = batch.labels[i:j]
    mask = batch.attention_mask[i:j] if batch.attention_mask is not None else None
    tokens = sum(map(sum, mask)) if mask is not None else sum(len(r) for r in labels)
    return Batch(
        batch.input_ids[i:j],
        labels,
        position_ids=batch.position_ids[i:j] if batch.position_ids is not None else None,
        attention_mask=mask,
        tokens=tokens,
        target_tokens=sum(target_count(r) for r in labels),
    )


def release_freed_memory(device_type: str) -> bool:
    """Lower glibc's mmap threshold (CPU runs with GRAFT_MALLOC_TUNE=1); True when it was set.
    Opt-in: it roughly halved the engine's tokens/s with two threads (every freed tensor's
    pages go back and come again), for a peak RSS 0.7 times the budget alone's."""
    if device_type != "cpu" or os.environ.get("GRAFT_MALLOC_TUNE", "0") != "1":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
