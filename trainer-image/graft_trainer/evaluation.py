"""Evaluation: eval loss and perplexity, generated-text metrics, early stopping, overfitting."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from graft_trainer.data import Example, PromptText, collate_padded
from graft_trainer.lm_loss import causal_lm_loss

LOWER_IS_BETTER = {"eval_loss", "perplexity", "loss"}

# ---------------------------------------------------------------- metric functions


def normalize(text: str) -> str:
    return " ".join(text.strip().split())


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    from sklearn.metrics import accuracy_score

    return float(
        accuracy_score([normalize(r) for r in references], [normalize(p) for p in predictions])
    )


def macro_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Macro F1 over the reference labels (a generation outside them counts as wrong)."""
    from sklearn.metrics import f1_score

    refs = [normalize(r) for r in references]
    preds = [normalize(p) for p in predictions]
    labels = sorted(set(refs))
    return float(f1_score(refs, preds, labels=labels, average="macro", zero_division=0))


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu), scaled to 0..1."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score) / 100.0


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (rouge-score)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    if not predictions:
        return 0.0
    scores = [
        scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)
    ]
    return float(sum(scores) / len(scores))


GENERATED = {"accuracy": accuracy, "f1": macro_f1, "bleu": bleu, "rouge": rouge_l}

# ---------------------------------------------------------------- model evaluation


def eval_loss(
    model: Any, examples: Sequence[Example], batch_size: int, pad_id: int, device: Any, amp: Any
) -> float:
    """Mean per-token loss on the examples (token-weighted across batches)."""
    import torch

    model.eval()
    total = 0.0
    count = 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    with torch.no_grad(), _autocast(device, amp):
        for i in range(0, len(order), batch_size):
            batch = collate_padded([examples[j] for j in order[i : i + batch_size]], pad_id)
            if batch.target_tokens == 0:
                continue
            loss = causal_lm_loss(model, batch.tensors(device))
            total += float(loss) * batch.target_tokens
            count += batch.target_tokens
    model.train()
    return total / count if count else float("nan")


def _autocast(device: Any, dtype: Any) -> Any:
    import contextlib

    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=str(device).split(":")[0], dtype=dtype)


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    device: Any,
    stop: str = "",
) -> list[str]:
    """Greedy continuations of the prompts, cut at `stop` (the template's text after the
    label), at a newline when stop starts with one, or at the end-of-sequence token."""
    import torch

    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    try:
        with torch.no_grad():
            for i in range(0, len(prompts), batch_size):
                chunk = list(prompts[i : i + batch_size])
                enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
                gen = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                new = gen[:, enc["input_ids"].shape[1] :]
                for row in new:
                    text = tokenizer.decode(row, skip_special_tokens=False)
                    outputs.append(cut_generation(text, stop, tokenizer))
    finally:
        tokenizer.padding_side = old_side
        model.train()
    return outputs


def cut_generation(text: str, stop: str, tokenizer: Any = None) -> str:
    markers = [m for m in (stop.strip(), "\n" if stop.startswith("\n") else "") if m]
    if tokenizer is not None:
        markers += [t for t in (tokenizer.eos_token, tokenizer.pad_token) if t]
    cut = len(text)
    for m in markers:
        at = text.find(m)
        if at >= 0:
            cut = min(cut, at)
    return text[:cut].strip()


@dataclass
class Evaluator:
    """Computes the configured metrics on the eval split."""

    metrics: list[str]
    examples: list[Example]
    texts: list[PromptText]
    pad_id: int
    batch_size: int
    max_new_tokens: int
    max_generation_samples: int
    stop: str = ""

    def run(
        self, model: Any, tokenizer: Any, device: Any, amp: Any, generate_texts: bool = True
    ) -> tuple[dict[str, float], list[dict[str, str]]]:
        out: dict[str, float] = {}
        samples: list[dict[str, str]] = []
        if not self.examples:
            return out, samples
        loss = eval_loss(model, self.examples, self.batch_size, self.pad_id, device, amp)
        out["eval_loss"] = loss
        out["perplexity"] = math.exp(min(loss, 50.0))
        wanted = [m for m in self.metrics if m in GENERATED]
        if wanted and generate_texts:
            texts = [t for t in self.texts if t.reference is not None][
                : self.max_generation_samples
            ]
            preds = generate(
                model,
                tokenizer,
                [t.prompt for t in texts],
                self.max_new_tokens,
                self.batch_size,
                device,
                self.stop,
            )
            refs = [str(t.reference) for t in texts]
            for name in wanted:
                out[name] = GENERATED[name](preds, refs)
            samples = [
                {"prompt": t.prompt, "reference": r, "generated": p}
                for t, r, p in zip(texts[:8], refs[:8], preds[:8], strict=True)
            ]
        return out, samples


# ---------------------------------------------------------------- stopping and warnings


def metric_key(name: str) -> str:
    return "eval_loss" if name in ("loss", "eval_loss") else name


@dataclass
class BestTracker:
    """Which evaluation was best so far on `metric`, with patience-based early stopping."""

    metric: str = "eval_loss"
    patience: int | None = None
    min_delta: float = 0.0
    best_value: float | None = None
    best_step: int | None = None
    bad_evals: int = 0

    @property
    def lower_is_better(self) -> bool:
        return self.metric in LOWER_IS_BETTER

    def update(self, step: int, value: float) -> bool:
        """Record an evaluation; True when it is the new best."""
        if math.isnan(value):
            self.bad_evals += 1
            return False
        if self.best_value is None:
            improved = True
        elif self.lower_is_better:
            improved = value < self.best_value - self.min_delta
        else:
            improved = value > self.best_value + self.min_delta
        if improved:
            self.best_value, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_evals >= self.patience

    def state(self) -> dict[str, Any]:
        return {
            "best_value": self.best_value,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
        }

    def load(self, state: dict[str, Any]) -> None:
        self.best_value = state.get("best_value")
        self.best_step = state.get("best_step")
        self.bad_evals = int(state.get("bad_evals", 0))


@dataclass
class OverfittingDetector:
    """Flags eval loss rising over `window` consecutive evaluations while train loss falls."""

    window: int = 2
    history: list[tuple[int, float, float]] = field(default_factory=list)  # step, train, eval
    since_step: int | None = None

    def update(self, step: int, train_loss: float, eval_loss: float) -> int | None:
        """Add an evaluation; returns the step where overfitting began when first detected."""
        self.history.append((step, train_loss, eval_loss))
        if self.since_step is not None or len(self.history) < self.window + 1:
            return None
        recent = self.history[-(self.window + 1) :]
        eval_rising = all(b[2] > a[2] for a, b in itertools.pairwise(recent))
        train_falling = all(b[1] < a[1] for a, b in itertools.pairwise(recent))
        if eval_rising and train_falling:
            self.since_step = recent[1][0]
            return self.since_step
        return None

    def state(self) -> dict[str, Any]:
        return {"history": self.history, "since_step": self.since_step}

    def load(self, state: dict[str, Any]) -> None:
        self.history = [tuple(h) for h in state.get("history", [])]  # type: ignore[misc]
        self.since_step = state.get("since_step")
