"""Metrics, early stopping and the overfitting detector (no model needed)."""

from __future__ import annotations

import math

import pytest

from graft_trainer.evaluation import (
    BestTracker,
    OverfittingDetector,
    accuracy,
    bleu,
    cut_generation,
    macro_f1,
    rouge_l,
)


def test_label_metrics() -> None:
    refs = ["positive", "negative", "neutral", "positive"]
    assert accuracy(refs, refs) == 1.0
    assert accuracy([" positive ", "negative", "positive", "x"], refs) == 0.5
    assert macro_f1(refs, refs) == 1.0
    assert 0.0 < macro_f1(["positive", "negative", "positive", "x"], refs) < 1.0


def test_generation_metrics_from_libraries() -> None:
    refs = ["the cat sat on the mat today", "a quick brown fox jumps high"]
    assert bleu(refs, refs) == pytest.approx(1.0)
    assert bleu(["dog runs", "blue sky"], refs) < 0.1
    assert rouge_l(refs, refs) == pytest.approx(1.0)
    partial = rouge_l(["the cat sat", "a fox"], refs)
    assert 0.2 < partial < 0.8


def test_generations_are_cut_at_the_template_suffix() -> None:
    assert cut_generation("positive<|end|>\nmore", "<|end|>") == "positive"
    assert cut_generation(" neutral\nnext line", "\n") == "neutral"
    assert cut_generation("negative", "") == "negative"


def test_early_stopping_stops_after_patience_without_improvement() -> None:
    tracker = BestTracker(metric="eval_loss", patience=2, min_delta=0.01)
    assert tracker.update(10, 1.0)
    assert tracker.update(20, 0.9)
    assert not tracker.update(30, 0.895)  # within min_delta: not an improvement
    assert not tracker.should_stop
    assert not tracker.update(40, 0.95)
    assert tracker.should_stop and tracker.best_step == 20


def test_higher_is_better_metrics_and_state_round_trip() -> None:
    tracker = BestTracker(metric="accuracy", patience=3)
    tracker.update(1, 0.3)
    tracker.update(2, 0.5)
    tracker.update(3, 0.4)
    copy = BestTracker(metric="accuracy", patience=3)
    copy.load(tracker.state())
    assert (copy.best_step, copy.best_value, copy.bad_evals) == (2, 0.5, 1)
    assert not copy.update(4, math.nan)


def test_overfitting_detected_with_the_step_where_it_began() -> None:
    det = OverfittingDetector(window=2)
    assert det.update(10, 2.0, 1.5) is None
    assert det.update(20, 1.5, 1.2) is None  # both falling: fine
    assert det.update(30, 1.2, 1.3) is None  # one rise is noise
    assert det.update(40, 1.0, 1.4) == 30  # two rises while train falls
    assert det.update(50, 0.8, 1.6) is None  # reported once


def test_no_overfitting_when_train_loss_rises_too() -> None:
    det = OverfittingDetector(window=2)
    for step, (tr, ev) in enumerate([(1.0, 1.0), (1.1, 1.1), (1.2, 1.2), (1.3, 1.3)]):
        assert det.update(step, tr, ev) is None
