"""The training engine: one FineTuneJob from pre-flight to the manifest of its outputs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from graft.api.finetune import (
    GENERATION_METRICS,
    FineTuneJobSpec,
    FineTuneMetrics,
    FineTuneProgress,
    TrainingWarning,
)
from graft.progress import ProgressEvent, Reporter, Stage
from graft.storage import open_store
from graft.storage.uri import join_uri
from graft_trainer import attention, lm_loss, observability, parallel, swiglu
from graft_trainer import data as D
from graft_trainer.checkpoints import CheckpointManager, set_rng_state
from graft_trainer.evaluation import BestTracker, Evaluator, OverfittingDetector, metric_key
from graft_trainer.hub import PINS_FILE, RevisionPins
from graft_trainer.methods import (
    autocast_dtype,
    load_model,
    load_trainable_state,
    precision_warnings,
    trainable_state,
)
from graft_trainer.preemption import Preempted, TerminationRequest
from graft_trainer.preflight import Prepared, prepare
from graft_trainer.runtime import gpu_memory, peak_rss_bytes, quiet_libraries
from graft_trainer.tensorboard import LiveTensorBoard

log = logging.getLogger("graft_trainer.engine")


@dataclass
class JobIdentity:
    name: str
    namespace: str = "local"
    uid: str = ""


@dataclass
class RunResult:
    final_step: int
    total_steps: int
    resumed_from: int | None
    stopped_early: bool
    best_step: int | None
    baseline: dict[str, float]
    final: dict[str, float]
    warnings: list[TrainingWarning]
    artifacts: dict[str, str]
    history: list[dict[str, Any]] = field(default_factory=list)
    output_dir: Path | None = None


EvalHook = Callable[[int, int, dict[str, float]], None]


def spec_digest(spec: FineTuneJobSpec) -> str:
    """What must match for a checkpoint to be resumed: everything that shapes training."""
    api = spec.to_api()
    keep = {
        k: api.get(k) for k in ("model", "dataset", "method", "lora", "quantization", "training")
    }
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


class Engine:
    def __init__(
        self,
        spec: FineTuneJobSpec,
        identity: JobIdentity,
        artifacts_uri: str,
        reporter: Reporter,
        work_dir: Path | None = None,
        prepared: Prepared | None = None,
        on_evaluate: EvalHook | None = None,
        generate_during_eval: bool = False,
    ) -> None:
        self.spec = spec
        self.identity = identity
        self.prefix = artifacts_uri if artifacts_uri.endswith("/") else artifacts_uri + "/"
        self.reporter = reporter
        self.store = open_store(self.prefix)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._termination: TerminationRequest | None = None
        if work_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="graft-")
            work_dir = Path(self._tmp.name)
        self.work_dir = work_dir
        self.prepared = prepared
        # Called after each evaluation during training with (step, total steps, metrics);
        # an exception it raises ends the run there (a search prunes a trial this way).
        self.on_evaluate = on_evaluate
        self.generate_during_eval = generate_during_eval
        self.metrics = FineTuneMetrics()
        self.progress = FineTuneProgress()
        self.warnings: list[TrainingWarning] = []
        self.artifacts: dict[str, str] = {}
        self.history: list[dict[str, Any]] = []
        self.live: LiveTensorBoard | None = None
        self.started = datetime.now(UTC)
        # Data parallel (parallel.py): only the main process reports and writes.
        self.processes = 1
        self.main_process = True

    # ------------------------------------------------------------ reporting

    def emit(self, stage: Stage, message: str = "") -> None:
        if not self.main_process:
            return
        self.progress.updated_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = ProgressEvent(
            stage=stage,
            progress=self.progress.model_copy(),
            metrics=self.metrics.model_copy(),
            warnings=list(self.warnings),
            message=message,
            artifacts=dict(self.artifacts),
        )
        with contextlib.suppress(Exception):
            self.reporter.report(event)
        log.info(
            message or stage,
            extra={"fields": {"stage": stage, "step": self.progress.step, **self.metrics.to_api()}},
        )

    def record(self, entry: dict[str, Any]) -> None:
        """One logged or evaluated step: into the history and the live TensorBoard file."""
        self.history.append(entry)
        if self.live is not None:
            self.live.add(entry)

    def warn(self, kind: Any, message: str, since: int | None = None) -> None:
        if any(w.type == kind and w.message == message for w in self.warnings):
            return
        self.warnings.append(TrainingWarning(type=kind, since_step=since, message=message))

    def set_memory_metrics(self, gpu: dict[str, int], rss: int) -> None:
        """Peak memory so far into status.metrics: host RSS, and the GPU's where one is used."""
        self.metrics.peak_host_memory_bytes = rss
        self.metrics.peak_gpu_memory_bytes = gpu.get("gpuAllocatedBytes") or None
        self.metrics.peak_gpu_reserved_bytes = gpu.get("gpuReservedBytes") or None
        self.metrics.peak_memory_bytes = self.metrics.peak_gpu_memory_bytes or rss

    def set_eval_metrics(self, values: dict[str, float]) -> None:
        for key, attr in (
            ("eval_loss", "eval_loss"),
            ("perplexity", "perplexity"),
            ("accuracy", "accuracy"),
            ("f1", "f1"),
            ("bleu", "bleu"),
            ("rouge", "rouge"),
        ):
            if key in values:
                setattr(self.metrics, attr, values[key])

    # ------------------------------------------------------------ the run

    def run(self) -> RunResult:
        try:
            return self._run()
        finally:
            if self._termination is not None:
                self._termination.restore()
            if self._tmp is not None:
                self._tmp.cleanup()

    def _run(self) -> RunResult:
        import torch

        spec, t, ds = self.spec, self.spec.training, self.spec.dataset
        quiet_libraries()
        self.emit("preflight", "checking the output store, data, tokenizer and model")
        self.store.check(self.prefix, write=True)
        # hf:// sources resolve to the commits of the resource's first attempt (sources.json
        # beside its artifacts), so a retried or resumed pod trains on the same bytes.
        pins = RevisionPins.load(join_uri(self.prefix, PINS_FILE), self.store)
        prep = self.prepared or prepare(spec, pins)
        for w in prep.warnings:
            self.warn("MemoryPressure" if "memory" in w else "Truncation", w)
        for slow in precision_warnings(spec, prep.device):
            self.warn("SlowPrecision", slow)
        torch.manual_seed(t.seed)
        self.emit(
            "loading",
            f"tokenizing {len(prep.train_records)} train / {len(prep.eval_records)} eval records",
        )
        data = self.tokenize(prep)
        tok = prep.tokenizer
        pad_id = int(tok.pad_token_id)
        device = torch.device(prep.device)
        amp = autocast_dtype(prep.precision)
        self.emit(
            "loading",
            f"loading {prep.model_dir.name} ({spec.method}, {prep.precision}, {prep.device})",
        )
        acc = parallel.accelerator(prep.device) if parallel.in_worker() else None
        world = acc.num_processes if acc is not None else 1
        rank = acc.process_index if acc is not None else 0
        self.processes, self.main_process = world, rank == 0
        if self.main_process:
            pins.save()
        model = load_model(spec, prep.model_dir, prep.device)
        swiglu.enable(model)  # SwiGLU MLPs keep two activations for the backward, not three
        model.train()
        # Ragged texts without padding: each micro-batch becomes one row with block-diagonal
        # attention (the same loss as padded batches, no pad tokens, no cross-text attention).
        flatten = (
            not ds.packing
            and os.environ.get("GRAFT_FLATTEN", "1") != "0"
            and spec.method != "qlora"
            and attention.enable(model)
        )

        accum = t.gradient_accumulation_steps
        batch = t.per_device_train_batch_size
        # Micro-batches per optimizer step, over all processes.
        per_step = accum * world
        per_epoch = max(1, data.batches_per_epoch(batch) // per_step)
        total = t.max_steps or max(
            1, math.ceil((t.epochs or 1.0) * data.batches_per_epoch(batch) / per_step)
        )
        self.progress.total_steps = total

        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        opt_kwargs: dict[str, Any] = {"lr": t.learning_rate}
        if prep.device == "cuda":
            opt_kwargs["fused"] = True
        else:
            opt_kwargs["foreach"] = True
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": t.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            **opt_kwargs,
        )
        from transformers import get_scheduler

        scheduler = get_scheduler(
            t.lr_scheduler,
            optimizer,
            num_warmup_steps=math.ceil(t.warmup_ratio * total),
            num_training_steps=total,
        )

        label_field = spec.evaluation.label_field
        stop = ""
        if ds.text_template is not None and label_field:
            stop = D.split_template(ds.text_template, label_field)[2]
        evaluator = Evaluator(
            [m for m in spec.evaluation.metrics],
            data.eval,
            data.eval_texts,
            pad_id,
            t.per_device_eval_batch_size,
            spec.evaluation.max_new_tokens,
            spec.evaluation.max_generation_samples,
            stop,
        )
        es = t.early_stopping
        tracker = BestTracker(
            metric=metric_key(es.metric) if es else "eval_loss",
            patience=es.patience if es else None,
            min_delta=es.min_delta if es else 0.0,
        )
        gen_during = tracker.metric in GENERATION_METRICS or self.generate_during_eval
        overfit = OverfittingDetector()
        best_weights: dict[str, Any] | None = None

        job_manifest = {
            "job": {
                "name": self.identity.name,
                "namespace": self.identity.namespace,
                "uid": self.identity.uid,
            },
            "specDigest": spec_digest(spec),
            "processes": world,
        }
        ckpts = CheckpointManager(
            join_uri(self.prefix, "checkpoints/"), self.store, self.work_dir, job_manifest
        )
        self.artifacts["checkpoints"] = ckpts.prefix
        if self.main_process:
            self.live = LiveTensorBoard(self.work_dir / "tensorboard-live", self.prefix, self.store)
            self.artifacts["tensorboard"] = join_uri(self.prefix, "tensorboard/")

        step = 0
        resumed_from: int | None = None
        baseline: dict[str, float] = {}
        baseline_samples: list[dict[str, str]] = []
        train_seconds = 0.0
        tokens_total = 0
        latest = ckpts.latest()
        if latest is not None and latest[1].get("specDigest") != job_manifest["specDigest"]:
            self.warn(
                "NoImprovement", f"ignoring checkpoint {latest[0]}: it was made by a different spec"
            )
            latest = None
        if latest is not None and int(latest[1].get("processes", 1)) != world:
            # The steps were counted in micro-batches of another number of processes.
            self.warn(
                "NoImprovement",
                f"ignoring checkpoint {latest[0]}: it was made by "
                f"{latest[1].get('processes', 1)} training processes, this run has {world}",
            )
            latest = None
        if latest is not None:
            loaded = ckpts.load(latest[0])
            state = loaded["state"]
            load_trainable_state(model, loaded["trainable"])
            optimizer.load_state_dict(loaded["optimizer"])
            scheduler.load_state_dict(loaded["scheduler"])
            set_rng_state(loaded["rng"])
            best_weights = loaded["best"]
            step = resumed_from = int(state["step"])
            baseline = state["baseline"]
            baseline_samples = state.get("baseline_samples", [])
            self.history = state["history"]
            tracker.load(state["tracker"])
            overfit.load(state["overfit"])
            train_seconds = float(state.get("train_seconds", 0.0))
            tokens_total = int(state.get("tokens_total", 0))
            self.warnings = [TrainingWarning.model_validate(w) for w in state.get("warnings", [])]
            self.progress.step = step
            self.emit("training", f"resumed from checkpoint at step {step} ({latest[0]})")
        elif self.main_process:
            self.emit("baseline", "measuring the base model on the eval split")
            baseline, baseline_samples = evaluator.run(model, tok, device, amp)
        self.metrics.baseline_eval_loss = baseline.get("eval_loss")
        self.metrics.baseline_accuracy = baseline.get("accuracy")

        def save_checkpoint() -> None:
            best = None
            if best_weights is not None and tracker.best_step != step:
                best = best_weights
            state = {
                "step": step,
                "baseline": baseline,
                "baseline_samples": baseline_samples,
                "history": self.history,
                "tracker": tracker.state(),
                "overfit": overfit.state(),
                "train_seconds": train_seconds,
                "tokens_total": tokens_total,
                "warnings": [w.to_api() for w in self.warnings],
            }
            if best is None and tracker.best_step == step:
                best = None
            ckpts.save(step, trainable_state(model), optimizer, scheduler, state, best)
            if self.live is not None:
                self.live.publish(force=True)

        stopped_early = False
        window_loss = 0.0
        window_steps = 0
        window_tokens = 0
        window_start = time.perf_counter()
        last_train_loss: float | None = None
        batches = data.batches(t.seed, batch, pad_id, start=step * per_step, flatten=flatten)
        # The loss through the LM head at target positions only (lm_loss; stock forward for
        # models it cannot wrap). DDP averages the gradients of the processes' shares of each
        # step: it wraps the module whose forward runs.
        loss_of = lm_loss.loss_module(model)
        train_model = acc.prepare_model(loss_of) if acc is not None else loss_of
        self.emit("training", f"training {total} steps ({per_epoch} per epoch)")
        termination = self._termination = TerminationRequest().install()
        while step < total:
            t0 = time.perf_counter()
            step_batches = [next(batches)[1] for _ in range(per_step)]
            # Every micro-batch of the step weighs by its target tokens, whichever process
            # takes it: the same gradient as one process accumulating them all.
            targets = sum(b.target_tokens for b in step_batches) or 1
            micro = step_batches[rank::world]
            step_loss = 0.0
            step_tokens = 0
            for i, b in enumerate(micro):
                inputs = b.tensors(device)
                last = i == len(micro) - 1
                with (
                    acc.no_sync(train_model)
                    if acc is not None and not last
                    else contextlib.nullcontext()
                ):
                    with (
                        torch.autocast(device_type=device.type, dtype=amp)
                        if amp is not None
                        else contextlib.nullcontext()
                    ):
                        raw = train_model(inputs)
                    loss = raw * (b.target_tokens / targets)
                    # DDP averages over the processes; undo its division.
                    (loss * world if world > 1 else loss).backward()
                step_loss += float(loss.detach())
                step_tokens += b.tokens
            if acc is not None:  # the step's loss and tokens over all processes
                stats = acc.reduce(
                    torch.tensor([step_loss, step_tokens], dtype=torch.float64, device=acc.device),
                    "sum",
                )
                step_loss, step_tokens = float(stats[0]), int(stats[1])
            window_tokens += step_tokens
            tokens_total += step_tokens
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            train_seconds += time.perf_counter() - t0
            observability.record_step(step, step_tokens)
            window_loss += step_loss
            window_steps += 1
            self.progress.step = step
            self.progress.epoch = round(step / per_epoch, 4)
            self.progress.percent = int(100 * step / total)

            if step % t.logging_steps == 0 or step == total:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                last_train_loss = window_loss / window_steps
                tps = window_tokens / elapsed
                rate = train_seconds / max(step - (resumed_from or 0), 1)
                self.progress.tokens_per_second = round(tps, 1)
                self.progress.eta_seconds = int(rate * (total - step))
                self.metrics.train_loss = last_train_loss
                gpu, rss = gpu_memory(), peak_rss_bytes()
                self.set_memory_metrics(gpu, rss)
                self.record(
                    {
                        "step": step,
                        "train_loss": last_train_loss,
                        "lr": scheduler.get_last_lr()[0],
                        "tokens_per_second": tps,
                        "epoch": self.progress.epoch,
                        "peak_rss_bytes": rss,
                        **gpu,
                    }
                )
                window_loss, window_steps, window_tokens = 0.0, 0, 0
                if self.live is not None:
                    self.live.publish()
                window_start = time.perf_counter()
                self.emit("training")

            if termination.requested and acc is None and step < total:
                save_checkpoint()
                self.emit("training", f"checkpoint at step {step}: stopping on SIGTERM")
                raise Preempted(step, total)
            evaluate = bool(data.eval) and (step % t.eval_steps == 0 or step == total)
            stop_now = False
            if evaluate and self.main_process:
                values, _ = evaluator.run(model, tok, device, amp, generate_texts=gen_during)
                self.set_eval_metrics(values)
                self.record({"step": step, **{f"eval/{k}": v for k, v in values.items()}})
                if self.live is not None:
                    self.live.publish(force=True)
                watched = values.get(tracker.metric)
                if watched is not None and tracker.update(step, watched):
                    best_weights = trainable_state(model)
                    self.metrics.best_step = step
                if last_train_loss is not None:
                    since = overfit.update(step, last_train_loss, values["eval_loss"])
                    if since is not None:
                        self.warn(
                            "Overfitting",
                            f"eval loss rose over {overfit.window} evaluations since step {since} "
                            "while train loss fell: consider fewer steps, more data, a lower "
                            "learning rate or early stopping",
                            since,
                        )
                self.emit("evaluating")
                if self.on_evaluate is not None:
                    self.on_evaluate(step, total, values)
                if tracker.should_stop:
                    stop_now = True
                    self.warn(
                        "NoImprovement",
                        f"early stopping at step {step}: {tracker.metric} did not improve by more "
                        f"than {tracker.min_delta} for {tracker.patience} evaluations "
                        f"(best {tracker.best_value:.4g} at step {tracker.best_step})",
                        tracker.best_step,
                    )
            if evaluate and acc is not None:  # the main process decides for all
                import torch.distributed as dist

                flag = torch.tensor([int(stop_now)], device=acc.device)
                dist.broadcast(flag, src=0)
                stop_now = bool(flag.item())
            if stop_now:
                stopped_early = True
                break
            if step % t.save_steps == 0 and step < total and self.main_process:
                save_checkpoint()
                self.emit("training", f"checkpoint at step {step}")

        termination.restore()  # past the loop, the run finishes what it started
        if self.live is not None:
            self.live.close()
        if not self.main_process:  # the main process evaluates and writes the outputs
            return RunResult(
                step, total, resumed_from, stopped_early, None, {}, {}, [], {}, [], None
            )

        # ------------------------------------------------------ final evaluation and export
        final_step = step
        if (
            best_weights is not None
            and tracker.best_step is not None
            and tracker.best_step != final_step
        ):
            load_trainable_state(model, best_weights)
        best_step = tracker.best_step if best_weights is not None else final_step
        self.metrics.best_step = best_step
        self.emit("evaluating", f"final evaluation of step {best_step}")
        final, samples = evaluator.run(model, tok, device, amp)
        self.set_eval_metrics(final)
        self.set_memory_metrics(gpu_memory(), peak_rss_bytes())  # the final evaluation's too
        self.progress.percent = 100 if not stopped_early else self.progress.percent

        from graft_trainer.outputs import OutputWriter

        self.emit("exporting", f"writing outputs to {self.prefix}")
        writer = OutputWriter(self, prep, data)
        writer.write(
            model=model,
            tokenizer=tok,
            final_step=final_step,
            total_steps=total,
            best_step=best_step,
            resumed_from=resumed_from,
            stopped_early=stopped_early,
            baseline=baseline,
            final=final,
            samples=samples,
            baseline_samples=baseline_samples,
            train_seconds=train_seconds,
            tokens_total=tokens_total,
        )
        self.emit(
            "done", f"finished at step {final_step}" + (" (early stop)" if stopped_early else "")
        )
        return RunResult(
            final_step,
            total,
            resumed_from,
            stopped_early,
            best_step,
            baseline,
            final,
            list(self.warnings),
            dict(self.artifacts),
            self.history,
            writer.out_dir,
        )

    def tokenize(self, prep: Prepared) -> D.TrainData:
        ds = self.spec.dataset
        tok = prep.tokenizer
        label = self.spec.evaluation.label_field
        train: list[D.Example] = []
        truncated = 0
        for i, r in enumerate(prep.train_records):
            texts = D.record_texts(ds, r, i, tok, label)
            ex = D.tokenize_record(texts, tok, ds.max_seq_length, ds.completion_only)
            truncated += ex.truncated
            train.append(ex)
        eval_ex: list[D.Example] = []
        eval_texts: list[D.PromptText] = []
        for i, r in enumerate(prep.eval_records):
            texts = D.record_texts(ds, r, i, tok, label)
            ex = D.tokenize_record(texts, tok, ds.max_seq_length, ds.completion_only)
            eval_ex.append(ex)
            eval_texts.append(texts)
        if truncated:
            self.warn(
                "Truncation",
                f"{truncated} of {len(train)} training texts are longer than maxSeqLength "
                f"{ds.max_seq_length} and were truncated",
            )
        if all(not any(x != -100 for x in e.labels[1:]) for e in train):
            from graft_trainer.errors import GraftInputError

            raise GraftInputError(
                "no training text has a token to learn after masking (check completionOnly and maxSeqLength)"
            )
        packed = D.pack_examples(train, ds.max_seq_length) if ds.packing else None
        counts: dict[str, dict[str, int]] = {}
        strat = ds.stratify_by or label
        if strat:
            for name, rows in (("train", prep.train_records), ("eval", prep.eval_records)):
                c: dict[str, int] = {}
                for r in rows:
                    c[str(r.get(strat))] = c.get(str(r.get(strat)), 0) + 1
                counts[name] = dict(sorted(c.items()))
        samples = [
            D.record_texts(ds, r, i, tok, label).prompt
            + D.record_texts(ds, r, i, tok, label).completion
            for i, r in enumerate(prep.train_records[:3])
        ]
        return D.TrainData(
            train, eval_ex, eval_texts, len(train), len(eval_ex), packed, truncated, counts, samples
        )
