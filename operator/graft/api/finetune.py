"""FineTuneJob: fine-tune a causal language model with LoRA, QLoRA, DoRA or full training."""

from __future__ import annotations

import re
import string
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from graft.api.base import (
    ApiModel,
    Location,
    ModelSource,
    ResourceName,
    Resources,
    RunSpec,
    RunStatus,
)
from graft.api.errors import PATTERN_HINTS, FieldPathError
from graft.api.search import SearchSpec, SearchStatus

_SPLIT_PART = r"[A-Za-z_][\w.-]*(\[(-?\d+%?)?:(-?\d+%?)?\])?(\((closest|pct1_dropremainder)\))?"
SPLIT_PATTERN = rf"^{_SPLIT_PART}(\+{_SPLIT_PART})*$"
PATTERN_HINTS[SPLIT_PATTERN] = (
    "expected datasets' split syntax such as 'train', 'train[:90%]' or 'train[:100]+test'"
)

Method = Literal["lora", "qlora", "dora", "full"]
EvalMetric = Literal["loss", "perplexity", "accuracy", "f1", "bleu", "rouge"]
GENERATION_METRICS = ("accuracy", "f1", "bleu", "rouge")
DEFAULT_EVAL_METRICS: tuple[EvalMetric, ...] = ("loss", "perplexity")
LABEL_METRICS = ("accuracy", "f1")


def template_fields(template: str) -> list[str]:
    """The `{field}` names of a text template, in order; raises ValueError if malformed."""
    names: list[str] = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(
                f"placeholder {{{name}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}} must be a plain field name such as {{phrase}}"
            )
        names.append(name)
    return names


class DatasetSpec(Location):
    """Training data and how each record becomes a training text."""

    format: Literal["auto", "json", "jsonl", "csv", "parquet", "hf"] = Field(
        default="auto",
        description="File format. auto picks it from the file extension (or hf for hf://).",
    )
    train_split: str = Field(
        default="train",
        max_length=256,
        pattern=SPLIT_PATTERN,
        description="Training records, in datasets' split syntax, e.g. 'train[:90%]'.",
    )
    eval_split: str | None = Field(
        default=None,
        max_length=256,
        pattern=SPLIT_PATTERN,
        description=(
            "Evaluation records, e.g. 'train[90%:]'. Without it there are no eval metrics and "
            "no early stopping."
        ),
    )
    stratify_by: str | None = Field(
        default=None,
        max_length=128,
        description=(
            "A label field: when trainSplit and evalSplit are percentages of one split, the "
            "records are divided so both keep the same label mix."
        ),
    )
    text_template: str | None = Field(
        default=None,
        max_length=16384,
        description=(
            "How a record becomes text, with {field} placeholders naming record fields, e.g. "
            "'<|user|>\\n{phrase}<|end|>\\n<|assistant|>\\n{tone}<|end|>'."
        ),
    )
    chat_template: bool = Field(
        default=False,
        description="Render the record's `messages` list with the tokenizer's chat template.",
    )
    completion_only: bool = Field(
        default=False,
        description=(
            "Compute the loss only on the completion: the text from the last template field "
            "on (or the last assistant message with chatTemplate)."
        ),
    )
    max_samples: int | None = Field(
        default=None,
        ge=1,
        description="Use at most this many training records. Unset uses all of them.",
    )
    max_seq_length: int = Field(
        default=1024, ge=8, le=131072, description="Longer tokenized texts are truncated."
    )
    packing: bool = Field(
        default=False,
        description="Pack several short texts into one sequence (attention stays per text).",
    )

    @model_validator(mode="after")
    def _check_text(self) -> DatasetSpec:
        if self.text_template is None and not self.chat_template:
            raise FieldPathError(
                ("textTemplate",), "set textTemplate, or chatTemplate: true for `messages` data"
            )
        if self.text_template is not None and self.chat_template:
            raise FieldPathError(
                ("chatTemplate",), "use either textTemplate or chatTemplate: true, not both"
            )
        if self.text_template is not None:
            try:
                fields = template_fields(self.text_template)
            except ValueError as exc:
                raise FieldPathError(("textTemplate",), str(exc)) from None
            if not fields:
                raise FieldPathError(("textTemplate",), "the template has no {field} placeholder")
        if self.stratify_by is not None and self.eval_split is None:
            raise FieldPathError(("stratifyBy",), "stratifyBy needs evalSplit")
        if self.format == "hf" and not self.uri.startswith("hf://"):
            raise FieldPathError(("format",), "format hf needs an hf:// dataset URI")
        return self


BRANCH_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._/-]*$"
PATTERN_HINTS[BRANCH_PATTERN] = "expected a branch name such as 'main' or 'v2'"


class PublishLocation(Location):
    """A Hugging Face Hub model repository the finished adapter is pushed to."""

    allowed_schemes: ClassVar[tuple[str, ...]] = ("hf",)
    refused_schemes: ClassVar[dict[str, str]] = {
        scheme: (
            "publish pushes the finished adapter to a Hub repository, hf://org/name; the "
            "job's checkpoints and artifacts go to spec.output"
        )
        for scheme in ("s3", "pvc", "file")
    }

    uri: str = Field(
        max_length=2048,
        description=(
            "hf://org/name: the model repository the finished adapter (or model, for method "
            "full) is pushed to, once its manifest is complete: weights, adapter_config.json, "
            "the model card README.md, tokenizer files and manifest.json. The repository is "
            "created private if it does not exist. spec.output stays the job's working store."
        ),
    )
    revision: str | None = Field(
        default=None,
        max_length=255,
        pattern=BRANCH_PATTERN,
        description=(
            "Branch to push to, created from main if missing. Default main. The commit pushed "
            "is recorded in status.artifacts.published."
        ),
    )
    credentials_secret: ResourceName | None = Field(
        default=None,
        description=(
            "Name of a Secret in the same namespace holding HF_TOKEN, a token allowed to write "
            "to the repository (and to create it). Without it the pod's HF_TOKEN, if any, is "
            "used (with `graft run`, the environment's)."
        ),
    )

    @model_validator(mode="after")
    def _check_repo(self) -> PublishLocation:
        if self.uri.removeprefix("hf://").strip("/").count("/") != 1:
            raise FieldPathError(
                ("uri",), f"name the repository as hf://org/name; got {self.uri!r}"
            )
        if self.revision is not None and re.fullmatch(r"[0-9a-f]{40}", self.revision):
            raise FieldPathError(
                ("revision",), "a push goes to a branch; a commit id cannot be pushed to"
            )
        return self


class LoraSpec(ApiModel):
    """Low-rank adapter settings (LoRA, QLoRA and DoRA)."""

    r: int = Field(default=16, ge=1, le=1024, description="Adapter rank.")
    alpha: int = Field(
        default=32, ge=1, le=4096, description="Scaling: updates are scaled by alpha/r."
    )
    dropout: float = Field(
        default=0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input."
    )
    target_modules: list[str] | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        description=(
            "Module names to adapt, e.g. [q_proj, v_proj]. Unset picks the architecture's "
            "attention projections; a name the model lacks is an error listing the real ones."
        ),
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="Modules trained in full and saved with the adapter, e.g. [lm_head].",
    )


class QuantizationSpec(ApiModel):
    """bitsandbytes quantization of the frozen base model (method qlora only)."""

    bits: Literal[4, 8] = Field(default=4, description="Bits per base weight.")
    type: Literal["nf4", "fp4"] = Field(default="nf4", description="4-bit data type.")
    double_quant: bool = Field(default=True, description="Quantize the quantization constants too.")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        default="bfloat16",
        description=(
            "Dtype of the matrix products. bfloat16 on a CPU without AVX-512 BF16 or AMX is "
            "emulated, about 100x slower (a SlowPrecision warning says so): use float32 there."
        ),
    )


class EarlyStoppingSpec(ApiModel):
    """Stop when the evaluation metric stops improving."""

    patience: int = Field(
        default=3, ge=1, le=1000, description="Evaluations without improvement before stopping."
    )
    metric: Literal["eval_loss", "perplexity", "accuracy", "f1", "bleu", "rouge"] = Field(
        default="eval_loss",
        description="Watched metric; loss and perplexity are minimized, the others maximized.",
    )
    min_delta: float = Field(
        default=0.0, ge=0.0, description="Smallest change that counts as an improvement."
    )


ShardingStrategy = Literal["none", "fsdp"]

# What was checked before refusing sharding with QLoRA (trainer image: torch 2.13, bitsandbytes
# 0.50.2, peft 0.21): FSDP2 does shard bitsandbytes 4-bit weights (a forward through a sharded
# 4-bit Llama equals the unsharded one), but Graft's sharded training loop is built and tested
# for method full only.
QLORA_SHARDING_REFUSAL = (
    "sharding fsdp is built for method full only. The trainer image's libraries (torch 2.13 "
    "FSDP2, bitsandbytes 0.50.2) can shard 4-bit weights, but Graft does not train a sharded "
    "QLoRA model yet; a QLoRA base is already a quarter of its fp16 size and only the adapter "
    "trains: use strategy none (resources.gpu > 1 trains it data-parallel), or method full"
)


class ShardingSpec(ApiModel):
    """How a full fine-tune's weights, gradients and optimizer state are split across its
    training processes (one per GPU of the pod), so that a model whose training state does
    not fit one GPU trains on several. Activation checkpointing is
    training.gradientCheckpointing, which works with sharding."""

    strategy: ShardingStrategy = Field(
        default="none",
        description=(
            "none: every process holds the whole model, its gradients and optimizer state "
            "(data parallel when resources.gpu > 1). fsdp: PyTorch FSDP shards them across the "
            "processes; each decoder block's weights are gathered only while it computes. "
            "method full only. Checkpoints are saved sharded (torch.distributed.checkpoint) and "
            "resume with another number of processes when it divides the checkpoint's "
            "micro-batches per step. With one process (resources.gpu 0 or 1) nothing is split."
        ),
    )
    mode: Literal["full", "hybrid"] = Field(
        default="full",
        description=(
            "full: shard across all processes of the job. hybrid: shard within a node and "
            "replicate across nodes; refused until sharding spans nodes (a sharded job runs "
            "in one pod, where hybrid is full sharding)."
        ),
    )
    cpu_offload: bool = Field(
        default=False,
        description=(
            "Keep the sharded weights, gradients and optimizer state in host memory and run "
            "the optimizer step on the CPU; each block's weights move to the GPU only while it "
            "computes. Saves GPU memory at the cost of speed. No effect on a CPU-only run. "
            "Needs strategy fsdp."
        ),
    )

    @model_validator(mode="after")
    def _check_knobs(self) -> ShardingSpec:
        if self.mode == "hybrid":
            raise FieldPathError(
                ("mode",),
                "hybrid shards within a node and replicates across nodes, and a sharded "
                "FineTuneJob runs in one pod on one node (sharding across resources.nodes is "
                "not built yet), where hybrid is full sharding: use mode full",
            )
        if self.cpu_offload and self.strategy != "fsdp":
            raise FieldPathError(
                ("cpuOffload",), "cpuOffload offloads sharded state: it needs strategy fsdp"
            )
        return self


class TrainingSpec(ApiModel):
    """The optimization loop."""

    max_steps: int | None = Field(
        default=None, ge=1, le=10_000_000, description="Optimizer steps. Exclusive with epochs."
    )
    epochs: float | None = Field(
        default=None,
        gt=0,
        le=1000,
        description="Passes over the training data. Default 1 when maxSteps is unset.",
    )
    learning_rate: float = Field(default=2.0e-4, gt=0, le=1.0, description="Peak learning rate.")
    lr_scheduler: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = Field(default="cosine", description="Learning-rate schedule after warmup.")
    warmup_ratio: float = Field(
        default=0.03, ge=0.0, le=1.0, description="Fraction of steps spent warming up."
    )
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    per_device_train_batch_size: int = Field(
        default=8, ge=1, le=4096, description="Batch per device."
    )
    per_device_eval_batch_size: int = Field(
        default=8, ge=1, le=4096, description="Eval batch per device."
    )
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, le=1024, description="Micro-batches summed into one optimizer step."
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description=(
            "Recompute activations in the backward pass to save memory (activation "
            "checkpointing of each decoder block; works with sharding fsdp)."
        ),
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto",
        description=(
            "auto uses bf16 where the hardware computes it natively (GPUs that have it; CPUs with "
            "AVX-512 BF16 or AMX), else fp16 on a GPU and fp32 on a CPU. An explicit bf16 on a "
            "CPU without native bf16 runs, about 100x slower, with a SlowPrecision warning."
        ),
    )
    seed: int = Field(default=42, ge=0, le=2**32 - 1, description="Seed for data order and init.")
    logging_steps: int = Field(default=10, ge=1, description="Report train loss every N steps.")
    eval_steps: int = Field(default=50, ge=1, description="Evaluate every N steps.")
    save_steps: int = Field(
        default=50,
        ge=1,
        description="Upload a resumable checkpoint every N steps; a restarted pod resumes from it.",
    )
    early_stopping: EarlyStoppingSpec | None = Field(
        default=None, description="Stop when the eval metric stalls. Needs dataset.evalSplit."
    )
    sharding: ShardingSpec | None = Field(
        default=None,
        description=(
            "Split a full fine-tune's weights, gradients and optimizer state across the pod's "
            "training processes (FSDP) instead of copying them to each. Unset: strategy none."
        ),
    )

    @property
    def sharded(self) -> bool:
        """True when the spec asks for FSDP sharding."""
        return self.sharding is not None and self.sharding.strategy == "fsdp"

    @model_validator(mode="after")
    def _check_length(self) -> TrainingSpec:
        if self.max_steps is not None and self.epochs is not None:
            raise FieldPathError(("epochs",), "set maxSteps or epochs, not both")
        return self


class EvaluationSpec(ApiModel):
    """What is measured on the eval split, before and after training."""

    metrics: list[EvalMetric] = Field(
        default_factory=lambda: list(DEFAULT_EVAL_METRICS),
        max_length=6,
        description=(
            "loss and perplexity come from the eval split; accuracy and f1 compare generated "
            "text with labelField; bleu and rouge score generations against the reference."
        ),
    )
    label_field: str | None = Field(
        default=None,
        max_length=128,
        description="The record field holding the expected answer (accuracy, f1, bleu, rouge).",
    )
    max_new_tokens: int = Field(
        default=16, ge=1, le=4096, description="Generation length for generated metrics."
    )
    max_generation_samples: int = Field(
        default=200,
        ge=1,
        le=100_000,
        description="Eval records generated for accuracy/f1/bleu/rouge (generation is slow).",
    )

    @model_validator(mode="after")
    def _check_label(self) -> EvaluationSpec:
        needs_label = [m for m in self.metrics if m in GENERATION_METRICS]
        if needs_label and self.label_field is None:
            raise FieldPathError(
                ("labelField",),
                f"metrics {needs_label} compare generations with labelField: set it",
            )
        return self


MAX_NODES = 64


class TrainingResources(Resources):
    """Compute the trainer pods ask for: one pod, or with nodes > 1 one pod per node."""

    # None, not 1, when unset: left out of the spec's dump, so the digests of specs written
    # before this field existed do not change (a running job would see its spec "changed").
    nodes: int | None = Field(
        default=None,
        ge=1,
        le=MAX_NODES,
        description=(
            "Pods that train together, one per node, each with `gpu` GPUs (and the cpu and "
            "memory above): the job's processes are nodes x max(gpu, 1), data-parallel over "
            "all of them, so perDeviceTrainBatchSize x gradientAccumulationSteps x processes "
            "is the global batch. The pods meet through a headless Service; the pod of node 0 "
            "evaluates, checkpoints and publishes. If one pod fails, is lost or cannot be "
            "scheduled, every pod of the attempt restarts from the last checkpoint. Unset: 1."
        ),
    )

    @property
    def node_count(self) -> int:
        return self.nodes or 1


class FineTuneJobSpec(RunSpec):
    """What to fine-tune, on which data, and how."""

    resources: TrainingResources = Field(
        default_factory=TrainingResources,
        description="CPU, memory and GPUs for each trainer pod, and how many pods (nodes).",
    )

    model: ModelSource = Field(description="The base model.")
    dataset: DatasetSpec = Field(description="Training (and evaluation) data.")
    method: Method = Field(
        default="lora",
        description="lora, qlora (4/8-bit base), dora (weight-decomposed LoRA) or full.",
    )
    lora: LoraSpec | None = Field(
        default=None, description="Adapter settings for lora, qlora and dora."
    )
    quantization: QuantizationSpec | None = Field(
        default=None, description="Base-model quantization; only with method qlora."
    )
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="The training loop.")
    evaluation: EvaluationSpec = Field(
        default_factory=EvaluationSpec, description="Metrics on the eval split."
    )
    search: SearchSpec | None = Field(
        default=None, description="Hyper-parameter search: run trials and keep the best."
    )
    publish: PublishLocation | None = Field(
        default=None,
        description=(
            "Also push the finished adapter to a Hugging Face Hub repository (hf://org/name), "
            "after its manifest is written to spec.output. A rerun whose adapter files equal "
            "what the branch holds pushes nothing. Not available with search."
        ),
    )

    @model_validator(mode="after")
    def _check_rules(self) -> FineTuneJobSpec:
        if self.method == "full" and self.lora is not None:
            raise FieldPathError(("lora",), "method full trains every weight; remove lora")
        if self.quantization is not None and self.method != "qlora":
            raise FieldPathError(("quantization",), "quantization is only used with method qlora")
        if self.training.sharded and self.method != "full":
            raise FieldPathError(
                ("training", "sharding", "strategy"),
                QLORA_SHARDING_REFUSAL
                if self.method == "qlora"
                else (
                    f"sharding fsdp is built for method full only; a {self.method} adapter's "
                    "weights, gradients and optimizer state are small: use strategy none "
                    "(resources.gpu > 1 trains it data-parallel), or method full"
                ),
            )
        self._check_nodes()
        if self.method in ("lora", "qlora", "dora") and self.lora is None:
            self.lora = LoraSpec()
        if self.method == "qlora" and self.quantization is None:
            self.quantization = QuantizationSpec()
        no_eval = self.dataset.eval_split is None
        if self.training.early_stopping is not None:
            if no_eval:
                raise FieldPathError(
                    ("training", "earlyStopping"), "early stopping needs dataset.evalSplit"
                )
            watched = self.training.early_stopping.metric
            if watched in GENERATION_METRICS and watched not in self.evaluation.metrics:
                raise FieldPathError(
                    ("training", "earlyStopping", "metric"),
                    f"{watched} is not computed: add it to evaluation.metrics",
                )
        generated = [m for m in self.evaluation.metrics if m in GENERATION_METRICS]
        if generated and no_eval:
            raise FieldPathError(("evaluation", "metrics"), f"{generated} need dataset.evalSplit")
        if self.dataset.completion_only and self.dataset.packing:
            raise FieldPathError(
                ("dataset", "packing"),
                "packing with completionOnly is not supported; turn one of them off",
            )
        if self.search is not None and self.publish is not None:
            raise FieldPathError(
                ("publish",),
                "publish is not supported with search yet: publish the best trial's adapter "
                "with a FineTuneJob of its parameters",
            )
        if self.search is not None:
            if no_eval:
                raise FieldPathError(("search",), "search compares trials on dataset.evalSplit")
            self.search.check_against(self.to_api(), FineTuneJobSpec)
        return self

    def _check_nodes(self) -> None:
        """What a multi-node job cannot be combined with (yet)."""
        if self.resources.node_count == 1:
            return
        if self.search is not None:
            raise FieldPathError(
                ("resources", "nodes"),
                "a search runs each trial in one pod: use nodes 1 with search (trials run "
                "side by side up to search.parallelism)",
            )
        if self.training.sharded:
            raise FieldPathError(
                ("training", "sharding", "strategy"),
                "sharding fsdp runs within one pod (its processes write a sharded checkpoint "
                "into a folder they share); with resources.nodes > 1 use strategy none "
                "(data parallel across the pods), or nodes 1 with resources.gpu > 1",
            )


class FineTuneProgress(ApiModel):
    """How far training has come, updated live while the pod trains."""

    step: int = Field(default=0, ge=0, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, ge=0, description="Steps planned.")
    percent: int | None = Field(default=None, ge=0, le=100, description="step / totalSteps.")
    epoch: float | None = Field(default=None, ge=0, description="Passes over the data so far.")
    eta_seconds: int | None = Field(default=None, ge=0, description="Estimated time left.")
    tokens_per_second: float | None = Field(default=None, ge=0, description="Training throughput.")
    updated_at: str | None = Field(
        default=None,
        description="When the trainer last reported (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )


class FineTuneMetrics(ApiModel):
    """Latest and final metrics."""

    train_loss: float | None = Field(default=None, description="Latest training loss.")
    eval_loss: float | None = Field(default=None, description="Latest evaluation loss.")
    perplexity: float | None = Field(default=None, description="exp(eval loss).")
    accuracy: float | None = Field(default=None, description="Exact-match accuracy of generations.")
    f1: float | None = Field(default=None, description="Macro F1 of generated labels.")
    bleu: float | None = Field(default=None, description="BLEU of generations.")
    rouge: float | None = Field(default=None, description="ROUGE-L of generations.")
    baseline_eval_loss: float | None = Field(default=None, description="Eval loss before training.")
    baseline_accuracy: float | None = Field(default=None, description="Accuracy before training.")
    best_step: int | None = Field(
        default=None, ge=0, description="Step of the exported checkpoint."
    )
    peak_memory_bytes: int | None = Field(
        default=None,
        ge=0,
        description="peakGpuMemoryBytes where the trainer uses a GPU, else peakHostMemoryBytes.",
    )
    peak_host_memory_bytes: int | None = Field(
        default=None, ge=0, description="Peak resident memory (RSS) of the training process."
    )
    peak_gpu_memory_bytes: int | None = Field(
        default=None,
        ge=0,
        description="Peak GPU memory held by tensors (torch.cuda.max_memory_allocated) on the "
        "trainer's GPU (rank 0's in data parallel runs); absent without a GPU.",
    )
    peak_gpu_reserved_bytes: int | None = Field(
        default=None,
        ge=0,
        description="Peak GPU memory held by PyTorch's caching allocator (what nvidia-smi shows "
        "of the process, less the CUDA context); absent without a GPU.",
    )


class TrainingWarning(ApiModel):
    """Something about the run a person should look at."""

    type: Literal[
        "Overfitting", "NoImprovement", "Truncation", "MemoryPressure", "SlowPrecision"
    ] = Field(description="What kind of warning.")
    since_step: int | None = Field(default=None, ge=0, description="Step where it began.")
    message: str = Field(max_length=4096, description="What was seen and what to try.")


class FineTuneArtifacts(ApiModel):
    """Artifact URIs; each appears once its manifest.json exists, except checkpoints and
    tensorboard, which are named when training starts."""

    adapter: str | None = Field(default=None, description="PEFT adapter directory.")
    model: str | None = Field(default=None, description="Full model directory (method full).")
    checkpoints: str | None = Field(default=None, description="Prefix of resumable checkpoints.")
    report: str | None = Field(default=None, description="Self-contained report.html.")
    metrics: str | None = Field(default=None, description="metrics.json.")
    published: str | None = Field(
        default=None,
        description=(
            "hf://org/name@<commit>: the Hub commit holding the adapter spec.publish pushed "
            "(or found already there with the same files)."
        ),
    )
    tensorboard: str | None = Field(
        default=None,
        description=(
            "TensorBoard event files (tensorboard --logdir): live/ holds each attempt's file, "
            "uploaded with every checkpoint and evaluation while training runs; the complete "
            "run's file is added beside it when the job succeeds."
        ),
    )


class FineTuneJobStatus(RunStatus):
    """What the operator and trainer have observed."""

    failed_attempts: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Attempts of a multi-node job (resources.nodes > 1) that failed by the trainer's "
            "fault, counted toward backoffLimit; an attempt whose pod was lost does not count, "
            "one whose pods all stayed while one lost its peer (a hung peer) does."
        ),
    )
    progress: FineTuneProgress | None = Field(default=None, description="Live training progress.")
    metrics: FineTuneMetrics | None = Field(default=None, description="Training and eval metrics.")
    warnings: list[TrainingWarning] = Field(
        default_factory=list, max_length=32, description="Things to look at."
    )
    artifacts: FineTuneArtifacts | None = Field(default=None, description="Where outputs are.")
    search: SearchStatus | None = Field(default=None, description="Hyper-parameter search state.")
