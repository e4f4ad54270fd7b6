"""The training engine: one FineTuneJob from pre-flight to the manifest of its outputs."""

from __future__ import annotations

import contextlib
import copy
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
from graft_trainer import attention, lm_loss, memory, parallel, sharding, swiglu
from graft_trainer import data as D
from graft_trainer.checkpoints import CheckpointManager, agreed_checkpoint, set_rng_state
from graft_trainer.evaluation import BestTracker, Evaluator, OverfittingDetector, metric_key
from graft_trainer.hub import PINS_FILE, RevisionPins
from graft_trainer.methods import (
    autocast_dtype,
    load_model,
    load_trainable_state,
    precision_warnings,
    trainable_state,
)
from graft_trainer.preemption import TerminationRequest
from graft_trainer.preflight import Prepared, prepare
from graft_trainer.runtime import gpu_memory, peak_rss_bytes, quiet_libraries
from graft_trainer.tensorboard import LiveTensorBoard
from graft_trainer.training import (
    Callback,
    CheckpointCallback,
    Control,
    EarlyStoppingCallback,
    EvaluationCallback,
    GatherCallback,
    LoggingCallback,
    PreemptionCallback,
    ProgressCallback,
    PruneCallback,
    TrainingState,
)

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
        self.token_budget = 0  # tokens per forward/backward (memory.token_budget; 0: whole)
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
        """The stages: preflight, load, resume (or measure the baseline), train, then in the
        main process the final evaluation and the outputs."""
        quiet_libraries()
        prep, pins = self._preflight()
        state = self._load(prep, pins)
        resumed = self._resume(state)
        self._baseline(state, measure=not resumed and self.main_process)
        self._train(state)
        if state.sharded:  # rank 0's copy gets the last step's weights
            sharding.gather(state.train_model.inner, state.model if self.main_process else None)
        if not self.main_process:  # the main process evaluates and writes the outputs
            return RunResult(
                state.step,
                state.total,
                state.resumed_from,
                state.stopped_early,
                None,
                {},
                {},
                [],
                {},
                [],
                None,
            )
        self._final_evaluation(state)
        return self._publish(state)

    def _preflight(self) -> tuple[Prepared, RevisionPins]:
        """The output store is writable; data, tokenizer and model are what the spec says."""
        import torch

        spec = self.spec
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
        torch.manual_seed(spec.training.seed)
        return prep, pins

    def _load(self, prep: Prepared, pins: RevisionPins) -> TrainingState:
        """Tokenized data, the model, optimizer and schedule, the evaluator, the checkpoints."""
        import torch

        spec, ds = self.spec, self.spec.dataset
        self.emit(
            "loading",
            f"tokenizing {len(prep.train_records)} train / {len(prep.eval_records)} eval records",
        )
        data = self.tokenize(prep)
        device = torch.device(prep.device)
        memory.release_freed_memory(device.type)  # GRAFT_MALLOC_TUNE=1: freed pages go back
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
        # training.sharding fsdp with several processes: the model is sharded (sharding.py)
        # from host memory, each rank moving only its shards to the device.
        sharded = spec.training.sharded and world > 1
        model = load_model(spec, prep.model_dir, "cpu" if sharded else prep.device)
        swiglu.enable(model)  # SwiGLU MLPs keep two activations for the backward, not three
        # Whole micro-batches when several processes train together: every forward of a
        # sharded (FSDP) model is a collective, so the processes must run as many forwards as
        # each other, and their micro-batches would split into different numbers of pieces.
        self.token_budget = (
            memory.token_budget(device.type, getattr(model, "config", None)) if world == 1 else 0
        )
        model.train()
        # Ragged texts without padding: each micro-batch becomes one row with block-diagonal
        # attention (the same loss as padded batches, no pad tokens, no cross-text attention).
        flatten = (
            not ds.packing
            and os.environ.get("GRAFT_FLATTEN", "1") != "0"
            and spec.method != "qlora"
            and attention.enable(model)
        )
        checkpoints = self._checkpoints(world)
        resume_point, per_step = self._resume_point(checkpoints, world, acc)
        total, per_step, per_epoch = self._schedule(data, world, per_step)
        checkpoints.job_manifest["microBatchesPerStep"] = per_step
        # The loss through the LM head at target positions only (lm_loss; stock forward for
        # models it cannot wrap): what DDP wraps, or FSDP's root unit.
        train_model = lm_loss.loss_module(model)
        plain = model
        if sharded:
            assert spec.training.sharding is not None
            # rank 0 evaluates and publishes an unsharded copy, kept in host memory
            plain = copy.deepcopy(model) if self.main_process else model
            sharding.shard(train_model, model, device, world, spec.training.sharding.cpu_offload)
        params, optimizer, scheduler = self._optimizer(model, prep.device, total, sharded)
        evaluator, tracker = self._evaluator(data, prep)
        if sharded:
            evaluator = sharding.OnDevice(evaluator, device)  # type: ignore[assignment]
        return TrainingState(
            prep=prep,
            data=data,
            model=plain,
            train_model=train_model,
            sharded=sharded,
            resume_point=resume_point,
            device=device,
            amp=amp,
            acc=acc,
            world=world,
            rank=rank,
            flatten=flatten,
            total=total,
            per_step=per_step,
            per_epoch=per_epoch,
            params=params,
            optimizer=optimizer,
            scheduler=scheduler,
            evaluator=evaluator,
            tracker=tracker,
            overfit=OverfittingDetector(),
            generate_during_eval=tracker.metric in GENERATION_METRICS or self.generate_during_eval,
            checkpoints=checkpoints,
        )

    def _schedule(
        self, data: D.TrainData, world: int, per_step: int | None = None
    ) -> tuple[int, int, int]:
        """(optimizer steps, micro-batches per step over all processes, steps per epoch);
        `per_step` is a resumed sharded checkpoint's, kept whatever the number of processes."""
        t = self.spec.training
        batch = t.per_device_train_batch_size
        per_step = per_step or t.gradient_accumulation_steps * world
        per_epoch = max(1, data.batches_per_epoch(batch) // per_step)
        total = t.max_steps or max(
            1, math.ceil((t.epochs or 1.0) * data.batches_per_epoch(batch) / per_step)
        )
        self.progress.total_steps = total
        return total, per_step, per_epoch

    def _optimizer(
        self, model: Any, device: str, total: int, sharded: bool = False
    ) -> tuple[list[Any], Any, Any]:
        """AdamW (no weight decay on biases and norms) and the learning-rate schedule."""
        import torch
        from transformers import get_scheduler

        t = self.spec.training
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        opt_kwargs: dict[str, Any] = {"lr": t.learning_rate}
        if device == "cuda" and not sharded:
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
        scheduler = get_scheduler(
            t.lr_scheduler,
            optimizer,
            num_warmup_steps=math.ceil(t.warmup_ratio * total),
            num_training_steps=total,
        )
        return params, optimizer, scheduler

    def _evaluator(self, data: D.TrainData, prep: Prepared) -> tuple[Evaluator, BestTracker]:
        """The metrics on the eval split, and the tracker of the best (early stopping's)."""
        spec, t, ds = self.spec, self.spec.training, self.spec.dataset
        label_field = spec.evaluation.label_field
        stop = ""
        if ds.text_template is not None and label_field:
            stop = D.split_template(ds.text_template, label_field)[2]
        evaluator = Evaluator(
            [m for m in spec.evaluation.metrics],
            data.eval,
            data.eval_texts,
            int(prep.tokenizer.pad_token_id),
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
        return evaluator, tracker

    def _checkpoints(self, world: int) -> CheckpointManager:
        """The run's checkpoints (and, in the main process, its live TensorBoard file)."""
        job_manifest = {
            "job": {
                "name": self.identity.name,
                "namespace": self.identity.namespace,
                "uid": self.identity.uid,
            },
            "specDigest": spec_digest(self.spec),
            "processes": world,
        }
        if self.spec.training.sharded:  # weights and optimizer state in a DCP folder
            job_manifest["format"] = "sharded"
        ckpts = CheckpointManager(
            join_uri(self.prefix, "checkpoints/"), self.store, self.work_dir, job_manifest
        )
        self.artifacts["checkpoints"] = ckpts.prefix
        if self.main_process:
            self.live = LiveTensorBoard(self.work_dir / "tensorboard-live", self.prefix, self.store)
            self.artifacts["tensorboard"] = join_uri(self.prefix, "tensorboard/")
        return ckpts

    def _resume_point(
        self, ckpts: CheckpointManager, world: int, acc: Any = None
    ) -> tuple[tuple[str, dict[str, Any]] | None, int | None]:
        """The latest checkpoint this run can continue from, and the micro-batches per step it
        keeps (a sharded checkpoint made by another number of processes), or (None, None).
        With several processes, rank 0's latest checkpoint is every process's."""
        latest = ckpts.latest()
        if acc is not None:
            latest = agreed_checkpoint(ckpts, latest, acc)
        if latest is None:
            return None, None
        uri, manifest = latest
        if manifest.get("specDigest") != ckpts.job_manifest["specDigest"]:
            self.warn(
                "NoImprovement", f"ignoring checkpoint {uri}: it was made by a different spec"
            )
            return None, None
        made_by = int(manifest.get("processes", 1))
        if made_by == world:
            return latest, None
        per_step = int(manifest.get("microBatchesPerStep") or 0)
        if manifest.get("format") == "sharded" and per_step and per_step % world == 0:
            # DCP reshards the weights and optimizer state; each process takes
            # per_step / world of each step's micro-batches: the same global batch.
            return latest, per_step
        # The steps were counted in micro-batches of another number of processes.
        reason = (
            f"ignoring checkpoint {uri}: it was made by {made_by} training processes, "
            f"this run has {world}"
        )
        if manifest.get("format") == "sharded":
            reason += f", which cannot share its {per_step} micro-batches per step evenly"
        self.warn("NoImprovement", reason)
        return None, None

    def _resume(self, state: TrainingState) -> bool:
        """Continue from the latest checkpoint made by this spec (with as many processes, or
        sharded with a number that divides its micro-batches per step); False when none."""
        if state.resume_point is None:
            return False
        uri, manifest = state.resume_point
        ckpts = state.checkpoints
        if manifest.get("format") == "sharded":
            # Rank 0 downloads (digests checked) where every rank reads its shards.
            local = sharding.shared_dir(self.work_dir) / "resume"
            if self.main_process:
                ckpts.download(uri, local)
            sharding.barrier(state.world)
            loaded = ckpts.read(local, uri, best=self.main_process)
            sharding.load(state.train_model, state.optimizer, local / sharding.SHARDED_DIR)
            sharding.barrier(state.world)
            if self.main_process:
                import shutil

                shutil.rmtree(local, ignore_errors=True)
        else:
            loaded = ckpts.load(uri)
            load_trainable_state(state.model, loaded["trainable"])
            state.optimizer.load_state_dict(loaded["optimizer"])
        saved = loaded["state"]
        state.scheduler.load_state_dict(loaded["scheduler"])
        set_rng_state(loaded["rng"])
        state.best_weights = loaded["best"]
        state.step = state.resumed_from = int(saved["step"])
        state.baseline = saved["baseline"]
        state.baseline_samples = saved.get("baseline_samples", [])
        self.history = saved["history"]
        state.tracker.load(saved["tracker"])
        state.overfit.load(saved["overfit"])
        state.train_seconds = float(saved.get("train_seconds", 0.0))
        state.tokens_total = int(saved.get("tokens_total", 0))
        self.warnings = [TrainingWarning.model_validate(w) for w in saved.get("warnings", [])]
        self.progress.step = state.step
        made_by = int(manifest.get("processes", 1))
        note = ""
        if made_by != state.world:
            note = (
                f"; made by {made_by} processes, resharded to {state.world}, each taking "
                f"{state.per_step // state.world} of each step's {state.per_step} micro-batches"
            )
        self.emit("training", f"resumed from checkpoint at step {state.step} ({uri}){note}")
        return True

    def _baseline(self, state: TrainingState, measure: bool) -> None:
        """The base model's metrics on the eval split (measured, or from the checkpoint)."""
        if measure:
            self.emit("baseline", "measuring the base model on the eval split")
            state.baseline, state.baseline_samples = state.evaluator.run(
                state.model, state.tokenizer, state.device, state.amp
            )
        self.metrics.baseline_eval_loss = state.baseline.get("eval_loss")
        self.metrics.baseline_accuracy = state.baseline.get("accuracy")

    def save_checkpoint(self, state: TrainingState) -> None:
        """A checkpoint of this step (with the best weights, when they are another step's).
        A sharded spec's: every rank writes its shards (sharding.save), rank 0 the rest."""
        best = None
        if state.best_weights is not None and state.tracker.best_step != state.step:
            best = state.best_weights
        local = None
        if self.spec.training.sharded:
            local = sharding.shared_dir(self.work_dir) / f"ckpt-{state.step:08d}"
            if self.main_process:
                import shutil

                shutil.rmtree(local, ignore_errors=True)
                local.mkdir(parents=True)
            sharding.barrier(state.world)
            sharding.save(state.train_model, state.optimizer, local / sharding.SHARDED_DIR)
            if not self.main_process:
                return
        state.checkpoints.save(
            state.step,
            trainable_state(state.model) if local is None else None,
            state.optimizer if local is None else None,
            state.scheduler,
            state.checkpoint_state(self.history, self.warnings),
            best,
            local=local,
        )
        if self.live is not None:
            self.live.publish(force=True)

    def _callbacks(
        self, logging: LoggingCallback, termination: TerminationRequest, sharded: bool
    ) -> list[Callback]:
        """What happens after every optimizer step, in this order."""
        callbacks: list[Callback] = [
            ProgressCallback(self),
            logging,
            PreemptionCallback(self, termination),
        ]
        if sharded:
            callbacks.append(GatherCallback(self))
        callbacks += [EvaluationCallback(self)]
        if self.on_evaluate is not None:
            callbacks.append(PruneCallback(self.on_evaluate))
        callbacks += [
            EarlyStoppingCallback(self),
            CheckpointCallback(self, self.spec.training.save_steps),
        ]
        return callbacks

    def _train(self, state: TrainingState) -> None:
        """Optimizer steps until the last (or an early stop), each followed by the callbacks."""
        t = self.spec.training
        logging = LoggingCallback(self, t.logging_steps)  # the first logging window starts
        pad_id = int(state.tokenizer.pad_token_id)
        batches = state.data.batches(
            t.seed,
            t.per_device_train_batch_size,
            pad_id,
            start=state.step * state.per_step,
            flatten=state.flatten,
        )
        # DDP averages the gradients of the processes' shares of each step: it wraps the
        # module whose forward runs (FSDP has wrapped it already: sharding.shard).
        train_model = state.train_model
        if state.acc is not None and not state.sharded:
            train_model = state.acc.prepare_model(train_model)
        self.emit("training", f"training {state.total} steps ({state.per_epoch} per epoch)")
        termination = self._termination = TerminationRequest().install()
        callbacks = self._callbacks(logging, termination, state.sharded)
        while state.step < state.total:
            t0 = time.perf_counter()
            self._optimizer_step(state, batches, train_model)
            state.step += 1
            state.train_seconds += time.perf_counter() - t0
            control = Control(
                evaluate=bool(state.data.eval)
                and (state.step % t.eval_steps == 0 or state.step == state.total)
            )
            for callback in callbacks:
                callback.on_step_end(state, control)
            if control.should_stop:
                state.stopped_early = True
                break
        termination.restore()  # past the loop, the run finishes what it started
        if self.live is not None:
            self.live.close()

    def _optimizer_step(self, state: TrainingState, batches: Any, train_model: Any) -> None:
        """One optimizer step over this process's share of the step's micro-batches."""
        import torch

        acc, world, device, amp = state.acc, state.world, state.device, state.amp
        step_batches = [next(batches)[1] for _ in range(state.per_step)]
        # Every micro-batch of the step weighs by its target tokens, whichever process
        # takes it: the same gradient as one process accumulating them all.
        targets = sum(b.target_tokens for b in step_batches) or 1
        micro = step_batches[state.rank :: world]
        step_tokens = sum(b.tokens for b in micro)
        # Forward and backward a token budget at a time (memory.py): each micro-batch in
        # pieces of whole texts or rows, weighted as above (the same gradient, less memory).
        micro = [piece for b in micro for piece in memory.split_batch(b, self.token_budget)]
        step_loss = 0.0
        for i, b in enumerate(micro):
            inputs = b.tensors(device)
            last = i == len(micro) - 1
            # FSDP reduce-scatters every micro-batch's gradients: its shards accumulate them
            # (skipping the sync would hold unsharded gradients).
            with (
                acc.no_sync(train_model)
                if acc is not None and not last and not state.sharded
                else contextlib.nullcontext()
            ):
                with (
                    torch.autocast(device_type=device.type, dtype=amp)
                    if amp is not None
                    else contextlib.nullcontext()
                ):
                    raw = train_model(inputs)
                loss = raw * (b.target_tokens / targets)
                # DDP (and FSDP) average over the processes; undo their division.
                (loss * world if world > 1 else loss).backward()
            step_loss += float(loss.detach())
        if acc is not None:  # the step's loss and tokens over all processes
            stats = acc.reduce(
                torch.tensor([step_loss, step_tokens], dtype=torch.float64, device=acc.device),
                "sum",
            )
            step_loss, step_tokens = float(stats[0]), int(stats[1])
        state.tokens_total += step_tokens
        if state.sharded:
            sharding.clip_grad_norm_(state.params, 1.0, device)
        else:
            torch.nn.utils.clip_grad_norm_(state.params, 1.0)
        state.optimizer.step()
        if state.state_bytes is None:  # the first step: weights, gradients, optimizer state
            self._measure_state(state)
        state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.step_loss, state.step_tokens = step_loss, step_tokens

    def _measure_state(self, state: TrainingState) -> None:
        """The largest process's bytes of trainable weights, gradients and optimizer state
        after its first optimizer step (what sharding divides), into the history."""
        import torch

        n = sharding.training_state_bytes(state.params, state.optimizer)
        if state.acc is not None:
            import torch.distributed as dist

            t = torch.tensor([n], dtype=torch.float64, device=state.acc.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            n = int(t.item())
        state.state_bytes = n
        self.record({"step": state.step + 1, "training_state_bytes_per_process": n})
        log.info(
            "training state per process",
            extra={"fields": {"training_state_bytes_per_process": n, "processes": state.world}},
        )

    def _final_evaluation(self, state: TrainingState) -> None:
        """The best weights back in place (early stopping's best, when not the last step),
        then the metrics and samples the outputs report."""
        tracker = state.tracker
        if (
            state.best_weights is not None
            and tracker.best_step is not None
            and tracker.best_step != state.step
        ):
            load_trainable_state(state.model, state.best_weights)
        state.best_step = tracker.best_step if state.best_weights is not None else state.step
        self.metrics.best_step = state.best_step
        self.emit("evaluating", f"final evaluation of step {state.best_step}")
        state.final, state.samples = state.evaluator.run(
            state.model, state.tokenizer, state.device, state.amp
        )
        self.set_eval_metrics(state.final)
        self.set_memory_metrics(gpu_memory(), peak_rss_bytes())  # the final evaluation's too
        self.progress.percent = 100 if not state.stopped_early else self.progress.percent

    def _publish(self, state: TrainingState) -> RunResult:
        """The outputs (weights, metrics, report, manifest last; spec.publish's push)."""
        from graft_trainer.outputs import OutputWriter

        self.emit("exporting", f"writing outputs to {self.prefix}")
        writer = OutputWriter(self, state.prep, state.data)
        writer.write(
            model=state.model,
            tokenizer=state.tokenizer,
            final_step=state.step,
            total_steps=state.total,
            best_step=state.best_step,
            resumed_from=state.resumed_from,
            stopped_early=state.stopped_early,
            baseline=state.baseline,
            final=state.final,
            samples=state.samples,
            baseline_samples=state.baseline_samples,
            train_seconds=state.train_seconds,
            tokens_total=state.tokens_total,
        )
        self.emit(
            "done",
            f"finished at step {state.step}" + (" (early stop)" if state.stopped_early else ""),
        )
        return RunResult(
            state.step,
            state.total,
            state.resumed_from,
            state.stopped_early,
            state.best_step,
            state.baseline,
            state.final,
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
