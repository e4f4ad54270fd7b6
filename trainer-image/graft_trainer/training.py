"""What one run carries from stage to stage (`TrainingState`), and what happens after every
optimizer step, as callbacks the engine's training loop calls in order (transformers'
TrainerCallback in miniature): report progress, log, stop on SIGTERM, evaluate, prune (a
search's hook), stop early, checkpoint. A callback sets `control.should_stop` to end the loop
at this step; one that raises ends the run there."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from graft.api.finetune import FineTuneMetrics, FineTuneProgress
from graft.progress import Stage
from graft_trainer import observability
from graft_trainer.checkpoints import CheckpointManager
from graft_trainer.data import TrainData
from graft_trainer.evaluation import BestTracker, Evaluator, OverfittingDetector
from graft_trainer.methods import trainable_state
from graft_trainer.preemption import Preempted, TerminationRequest
from graft_trainer.preflight import Prepared
from graft_trainer.runtime import gpu_memory, peak_rss_bytes
from graft_trainer.tensorboard import LiveTensorBoard


@dataclass
class TrainingState:
    """The model, optimizer and helpers of one run (set by the load stage), and its
    bookkeeping: what a checkpoint holds and what the outputs report."""

    prep: Prepared
    data: TrainData
    model: Any  # what the main process evaluates and publishes (sharded: its unsharded copy)
    train_model: Any  # the loss module the steps run (lm_loss; FSDP's root unit when sharded)
    sharded: bool  # training.sharding fsdp with several processes (sharding.py)
    resume_point: tuple[str, dict[str, Any]] | None  # the checkpoint to resume (uri, manifest)
    device: Any  # torch.device
    amp: Any  # the autocast dtype, or None
    acc: Any  # accelerate.Accelerator in a data-parallel worker, else None
    world: int  # training processes
    rank: int
    flatten: bool  # ragged micro-batches as one block-diagonal row (attention.enable)
    total: int  # optimizer steps
    per_step: int  # micro-batches per optimizer step, over all processes
    per_epoch: int  # optimizer steps per epoch
    params: list[Any]
    optimizer: Any
    scheduler: Any
    evaluator: Evaluator
    tracker: BestTracker
    overfit: OverfittingDetector
    generate_during_eval: bool
    checkpoints: CheckpointManager
    step: int = 0
    resumed_from: int | None = None
    baseline: dict[str, float] = field(default_factory=dict)
    baseline_samples: list[dict[str, str]] = field(default_factory=list)
    train_seconds: float = 0.0
    tokens_total: int = 0
    best_weights: dict[str, Any] | None = None
    stopped_early: bool = False
    # the last optimizer step's loss and tokens (over all processes)
    step_loss: float = 0.0
    step_tokens: int = 0
    last_train_loss: float | None = None  # of the last logging window
    state_bytes: int | None = None  # the largest process's weights + gradients + optimizer
    # the final evaluation's (main process)
    best_step: int | None = None
    final: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, str]] = field(default_factory=list)

    @property
    def tokenizer(self) -> Any:
        return self.prep.tokenizer

    def checkpoint_state(
        self, history: list[dict[str, Any]], warnings: list[Any]
    ) -> dict[str, Any]:
        """The loop's bookkeeping as a checkpoint's state.json holds it."""
        return {
            "step": self.step,
            "baseline": self.baseline,
            "baseline_samples": self.baseline_samples,
            "history": history,
            "tracker": self.tracker.state(),
            "overfit": self.overfit.state(),
            "train_seconds": self.train_seconds,
            "tokens_total": self.tokens_total,
            "warnings": [w.to_api() for w in warnings],
        }


@dataclass
class Control:
    """One step's decisions: whether it evaluates (the same on every process), the metrics of
    its evaluation (main process only), whether the loop stops after it."""

    evaluate: bool = False
    values: dict[str, float] | None = None
    should_stop: bool = False


class Host(Protocol):
    """What the callbacks use of the engine (graft_trainer.engine.Engine)."""

    metrics: FineTuneMetrics
    progress: FineTuneProgress
    live: LiveTensorBoard | None
    main_process: bool

    def emit(self, stage: Stage, message: str = "") -> None: ...

    def record(self, entry: dict[str, Any]) -> None: ...

    def warn(self, kind: Any, message: str, since: int | None = None) -> None: ...

    def set_memory_metrics(self, gpu: dict[str, int], rss: int) -> None: ...

    def set_eval_metrics(self, values: dict[str, float]) -> None: ...

    def save_checkpoint(self, state: TrainingState) -> None: ...


class Callback:
    """Called after every optimizer step, in the order of the engine's list."""

    def on_step_end(self, state: TrainingState, control: Control) -> None:
        pass


class ProgressCallback(Callback):
    """The step, epoch and percentage in the status; the step's tokens in the metrics."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def on_step_end(self, state: TrainingState, control: Control) -> None:
        observability.record_step(state.step, state.step_tokens)
        progress = self.host.progress
        progress.step = state.step
        progress.epoch = round(state.step / state.per_epoch, 4)
        progress.percent = int(100 * state.step / state.total)


class LoggingCallback(Callback):
    """Every `logging_steps` (and at the last step): the window's mean train loss, tokens per
    second, learning rate and peak memory into the history, the live TensorBoard and the
    status. The first window starts when the callback is made."""

    def __init__(self, host: Host, logging_steps: int) -> None:
        self.host = host
        self.logging_steps = logging_steps
        self.loss = 0.0
        self.steps = 0
        self.tokens = 0
        self.start = time.perf_counter()

    def on_step_end(self, state: TrainingState, control: Control) -> None:
        self.tokens += state.step_tokens
        self.loss += state.step_loss
        self.steps += 1
        step, total = state.step, state.total
        if step % self.logging_steps != 0 and step != total:
            return
        host = self.host
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        state.last_train_loss = self.loss / self.steps
        tps = self.tokens / elapsed
        rate = state.train_seconds / max(step - (state.resumed_from or 0), 1)
        host.progress.tokens_per_second = round(tps, 1)
        host.progress.eta_seconds = int(rate * (total - step))
        host.metrics.train_loss = state.last_train_loss
        gpu, rss = gpu_memory(), peak_rss_bytes()
        host.set_memory_metrics(gpu, rss)
        host.record(
            {
                "step": step,
                "train_loss": state.last_train_loss,
                "lr": state.scheduler.get_last_lr()[0],
                "tokens_per_second": tps,
                "epoch": host.progress.epoch,
                "peak_rss_bytes": rss,
                **gpu,
            }
        )
        self.loss, self.steps, self.tokens = 0.0, 0, 0
        if host.live is not None:
            host.live.publish()
        self.start = time.perf_counter()
        host.emit("training")


class PreemptionCallback(Callback):
    """On SIGTERM (a single training process, before the last step): a checkpoint of this
    step, then `Preempted`."""

    def __init__(self, host: Host, termination: TerminationRequest) -> None:
        self.host = host
        self.termination = termination

    def on_step_end(self, state: TrainingState, control: Control) -> None:
        if self.termination.requested and state.acc is None and state.step < state.total:
            self.host.save_checkpoint(state)
            self.host.emit("training", f"checkpoint at step {state.step}: stopping on SIGTERM")
            raise Preempted(state.step, state.total)


class GatherCallback(Callback):
    """On an evaluation step of a sharded run, in every process: the sharded weights gathered
    into the main process's unsharded copy, which it evaluates."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def on_step_end(self, state: TrainingState, control: Control) -> None:
        if control.evaluate:
            from graft_trainer import sharding

            sharding.gather(
                state.train_model.inner, state.model if self.host.main_process else None
            )


class EvaluationCallback(Callback):
    """On an evaluation step, in the main process: the eval metrics into the status, history
    and TensorBoard; the best weights so far; an Overfitting warning when eval loss rises
    while train loss falls."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def on_step_end(self, state: TrainingState, control: Control) -> None:
        if not (control.evaluate and self.host.main_process):
            return
        host, step = self.host, state.step
        values, _ = state.evaluator.run(
            state.model,
            state.tokenizer,
            state.device,
            state.amp,
            generate_texts=state.generate_during_eval,
        )
        host.set_eval_metrics(values)
        host.record({"step": step, **{f"eval/{k}": v for k, v in values.items()}})
        if host.live is not None:
            host.live.publish(force=True)
        watched = values.get(state.tracker.metric)
        if watched is not None and state.tracker.update(step, watched):
            state.best_weights = trainable_state(state.model)
            host.metrics.best_step = step
        if state.last_train_loss is not None:
            since = state.overfit.update(step, state.last_train_loss, values["eval_loss"])
            if since is not None:
                host.warn(
                    "Overfitting",
                    f"eval loss rose over {state.overfit.window} evaluations since step {since} "
                    "while train loss fell: consider fewer steps, more data, a lower "
                    "learning rate or early stopping",
                    since,
                )
        host.emit("evaluating")
        control.values = values


class PruneCallback(Callback):
    """The engine's `on_evaluate(step, total, metrics)` after each evaluation; what it raises
    ends the run (a search prunes a trial this way)."""

    def __init__(self, hook: Any) -> None:
        self.hook = hook

    def on_step_end(self, state: TrainingState, control: Control) -> None:
        if control.values is not None:
            self.hook(state.step, state.total, control.values)


class EarlyStoppingCallback(Callback):
    """Stop when the watched metric has not improved for `patience` evaluations; the main
    process decides for all."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def on_step_end(self, state: TrainingState, control: Control) -> None:
        tracker = state.tracker
        if control.values is not None and tracker.should_stop:
            control.should_stop = True
            self.host.warn(
                "NoImprovement",
                f"early stopping at step {state.step}: {tracker.metric} did not improve by more "
                f"than {tracker.min_delta} for {tracker.patience} evaluations "
                f"(best {tracker.best_value:.4g} at step {tracker.best_step})",
                tracker.best_step,
            )
        if control.evaluate and state.acc is not None:
            import torch
            import torch.distributed as dist

            flag = torch.tensor([int(control.should_stop)], device=state.acc.device)
            dist.broadcast(flag, src=0)
            control.should_stop = bool(flag.item())


class CheckpointCallback(Callback):
    """Every `save_steps` (not at the last step, nor at one that stops): a checkpoint, by the
    main process (by every process of a sharded spec, each writing its shards)."""

    def __init__(self, host: Host, save_steps: int) -> None:
        self.host = host
        self.save_steps = save_steps

    def on_step_end(self, state: TrainingState, control: Control) -> None:
        if control.should_stop:
            return
        step = state.step
        writes = self.host.main_process or state.sharded
        if step % self.save_steps == 0 and step < state.total and writes:
            self.host.save_checkpoint(state)
            self.host.emit("training", f"checkpoint at step {step}")
