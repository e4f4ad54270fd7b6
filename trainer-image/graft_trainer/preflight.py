"""Pre-flight: cheap checks before any heavy work, and the data/model preparation they share.

The dataset is readable and non-empty per split, every template field exists (the first
offending row is named), the tokenizer has what the template needs, the target modules exist
(checked on a weightless "meta" model) and a memory estimate fits the requested resources.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graft.api.finetune import FineTuneJobSpec, template_fields
from graft.storage import parse_uri
from graft_trainer import data as D
from graft_trainer.errors import GraftInputError
from graft_trainer.hub import RevisionPins
from graft_trainer.methods import (
    check_causal_lm,
    check_quantization,
    check_targets,
    default_targets,
    load_tokenizer,
    resolve_precision,
)
from graft_trainer.sources import fetch_model, load_splits


@dataclass
class Prepared:
    model_dir: Path
    config: Any
    tokenizer: Any
    train_records: list[D.Record]
    eval_records: list[D.Record]
    dataset_digest: str
    device: str
    precision: str
    targets: list[str] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # The commit an hf:// base model resolved to (None for other sources).
    model_commit: str | None = None


def device_name() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def select_records(
    spec: FineTuneJobSpec, splits: dict[str, list[D.Record]]
) -> tuple[list[D.Record], list[D.Record]]:
    ds = spec.dataset
    hf = parse_uri(ds.uri).scheme == "hf"
    if ds.stratify_by and ds.eval_split:
        train, evals = D.stratified_splits(splits, ds.train_split, ds.eval_split, ds.stratify_by)
    elif hf:
        train = splits[ds.train_split]
        evals = splits.get(ds.eval_split, []) if ds.eval_split else []
    else:
        train = D.select_split(splits, ds.train_split)
        evals = D.select_split(splits, ds.eval_split) if ds.eval_split else []
    if ds.max_samples is not None:
        train = train[: ds.max_samples]
    if not train:
        raise GraftInputError(
            f"trainSplit {ds.train_split!r} is empty (expected at least one record)"
        )
    if ds.eval_split and not evals:
        raise GraftInputError(
            f"evalSplit {ds.eval_split!r} is empty (expected at least one record)"
        )
    return train, evals


def check_records(spec: FineTuneJobSpec, train: list[D.Record], evals: list[D.Record]) -> None:
    ds = spec.dataset
    if ds.text_template is not None:
        D.check_template_fields(ds.text_template, train, f"trainSplit {ds.train_split!r}")
        D.check_template_fields(ds.text_template, evals, f"evalSplit {ds.eval_split!r}")
    else:
        for where, rows in (("trainSplit", train), ("evalSplit", evals)):
            for i, r in enumerate(rows):
                if not isinstance(r.get("messages"), list) or not r["messages"]:
                    raise GraftInputError(
                        f"{where} row {i}: chatTemplate needs a non-empty `messages` list "
                        f"(the record has: {', '.join(map(str, r))})"
                    )
    label = spec.evaluation.label_field
    if label and evals:
        if ds.text_template is not None and label not in template_fields(ds.text_template):
            raise GraftInputError(
                f"evaluation.labelField {label!r} is not a field of textTemplate "
                "(the prompt is the template up to that field)"
            )
        for i, r in enumerate(evals):
            if label not in r and ds.chat_template is False:
                raise GraftInputError(f"evalSplit row {i}: labelField {label!r} is missing")


def check_tokenizer(spec: FineTuneJobSpec, tokenizer: Any) -> list[str]:
    warnings = []
    if spec.dataset.chat_template and not getattr(tokenizer, "chat_template", None):
        raise GraftInputError(
            "dataset.chatTemplate is true but the tokenizer has no chat template; "
            "use textTemplate instead"
        )
    if tokenizer.eos_token_id is None:
        warnings.append(
            "the tokenizer has no end-of-sequence token; generations run to maxNewTokens"
        )
    template = spec.dataset.text_template or ""
    specials = set(re.findall(r"<\|[^|>]+\|>|<[a-z_]+>", template))
    known = set(tokenizer.get_vocab())
    unknown = sorted(s for s in specials if s not in known)
    if unknown:
        warnings.append(
            f"textTemplate markers {unknown} are not tokens of the tokenizer; they are split "
            "into pieces (train them, or use the model's own markers)"
        )
    return warnings


def parse_quantity(text: str | int | float) -> float:
    units = {
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "Pi": 2**50,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "P": 1e15,
        "m": 1e-3,
    }
    s = str(text)
    for unit, mult in sorted(units.items(), key=lambda u: -len(u[0])):
        if s.endswith(unit):
            return float(s[: -len(unit)]) * mult
    return float(s)


def meta_model(config: Any, trust_remote_code: bool) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def estimate_memory(
    spec: FineTuneJobSpec, model: Any, config: Any, precision: str, processes: int = 1
) -> dict[str, Any]:
    """A rough peak-memory estimate in bytes (per GPU: of each of `processes` when the spec
    shards), with its parts."""
    total = sum(p.numel() for p in model.parameters())
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 0)
    layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0) or 0)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    t = spec.training
    tokens = t.per_device_train_batch_size * spec.dataset.max_seq_length
    if spec.method == "qlora":
        bits = spec.quantization.bits if spec.quantization else 4
        weights = total * bits / 8 * 1.1
    else:
        weights = total * 4
    if spec.method == "full":
        trainable = total
    else:
        r = spec.lora.r if spec.lora else 16
        trainable = layers * 4 * 2 * r * hidden
    optimizer = trainable * (4 + 4 + 8)  # grads + Adam moments
    act_bytes = 2 if precision in ("bf16", "fp16") else 4
    per_layer = tokens * hidden * 18 * act_bytes
    activations = per_layer * (2 if t.gradient_checkpointing else max(layers, 1))
    logits = tokens * vocab * 4 * 3
    overhead = 300 * 2**20
    est = int(weights + optimizer + activations + logits + overhead)
    out: dict[str, Any] = {
        "parameters": total,
        "trainableParameters": trainable,
        "weightsBytes": int(weights),
        "optimizerBytes": int(optimizer),
        "activationsBytes": int(activations + logits),
        "estimatedBytes": est,
    }
    if t.sharding is not None and t.sharded and processes > 1:
        # FSDP (graft_trainer.sharding): each GPU holds its 1/processes of the weights,
        # gradients and optimizer state (none of them with cpuOffload) and the blocks being
        # gathered; rank 0 also holds the whole weights while it evaluates.
        share = 0.0 if t.sharding.cpu_offload else (weights + optimizer) / processes
        block = weights / max(layers, 1)
        training = share + 2 * block + activations + logits + overhead
        evaluating = share + weights + overhead
        out.update(
            weightsBytes=int(weights / processes),
            optimizerBytes=int(optimizer / processes),
            estimatedBytes=int(max(training, evaluating)),
            shardedOver=processes,
        )
    return out


def check_memory(spec: FineTuneJobSpec, est: dict[str, Any], device: str) -> list[str]:
    limit: float | None = None
    where = ""
    if device == "cuda":
        import torch

        limit = float(torch.cuda.get_device_properties(0).total_memory)
        where = "GPU memory"
    elif spec.resources.memory is not None:
        limit = parse_quantity(spec.resources.memory)
        where = f"resources.memory {spec.resources.memory}"
    if limit is None:
        return []
    need = est["estimatedBytes"]
    gib = 2**30
    text = (
        f"estimated peak memory {need / gib:.2f} GiB (weights {est['weightsBytes'] / gib:.2f}, "
        f"optimizer {est['optimizerBytes'] / gib:.2f}, activations {est['activationsBytes'] / gib:.2f}) "
        f"vs {where} = {limit / gib:.2f} GiB"
    )
    if need > limit:
        raise GraftInputError(
            text + "; lower perDeviceTrainBatchSize or maxSeqLength, enable gradientCheckpointing, "
            "use qlora, shard a full fine-tune over several GPUs (training.sharding.strategy "
            "fsdp), or ask for more memory"
        )
    if need > 0.8 * limit:
        return [text + " (above 80%)"]
    return []


def prepare(
    spec: FineTuneJobSpec, pins: RevisionPins | None = None, *, for_gpu_pod: bool = False
) -> Prepared:
    """Run every pre-flight check; returns what the engine needs next. hf:// sources are
    fetched at the commits `pins` holds, and the commits they resolve to are recorded there.

    `for_gpu_pod`: checked in a CPU pod on behalf of the GPU pod that runs next (the operator's
    pre-flight pod): the device is taken as the GPU, precision `auto` is estimated as bf16, and
    the memory estimate is reported but compared with the GPU's memory only in the GPU pod."""
    pins = pins if pins is not None else RevisionPins()
    if spec.publish is not None:  # before the GPU time a refused push would waste
        from graft_trainer.publish import check_write_access

        check_write_access(spec.publish)
    splits, digest = load_splits(spec.dataset, pins)
    train, evals = select_records(spec, splits)
    check_records(spec, train, evals)
    model_dir = fetch_model(spec.model, pins)
    config = check_causal_lm(model_dir, spec.model.trust_remote_code)
    tokenizer = load_tokenizer(model_dir, spec.model.trust_remote_code)
    warnings = check_tokenizer(spec, tokenizer)
    device = "cuda" if for_gpu_pod else device_name()
    if for_gpu_pod:
        precision = "bf16" if spec.training.precision == "auto" else spec.training.precision
    else:
        precision = resolve_precision(spec.training.precision, device)
    check_quantization(spec, device)
    meta = meta_model(config, spec.model.trust_remote_code)
    targets: list[str] = []
    if spec.method != "full":
        assert spec.lora is not None
        targets = spec.lora.target_modules or default_targets(meta)
        check_targets(meta, targets, spec.lora.modules_to_save)
    processes = 1
    if spec.training.sharded:  # the estimate is per GPU, of each process's share
        from graft_trainer import parallel

        processes = max(1, spec.resources.gpu) if for_gpu_pod else parallel.processes(spec)
    memory = estimate_memory(spec, meta, config, precision, processes)
    if not for_gpu_pod:
        warnings += check_memory(spec, memory, device)
    return Prepared(
        model_dir,
        config,
        tokenizer,
        train,
        evals,
        digest,
        device,
        precision,
        targets,
        memory,
        warnings,
        model_commit=pins.commit_for(spec.model.uri, spec.model.revision),
    )


def gpu_pod_summary(spec: FineTuneJobSpec, prep: Prepared) -> str:
    """What the pre-flight pod found, in one line for the resource's Validated condition."""
    mem = prep.memory
    model = getattr(prep.config, "architectures", None) or [prep.config.model_type]
    trainable = "all parameters" if spec.method == "full" else ", ".join(prep.targets)
    text = (
        f"pre-flight passed in a CPU pod: {len(prep.train_records)} training and "
        f"{len(prep.eval_records)} evaluation records; {model[0]} with "
        f"{mem['parameters'] / 1e6:.1f}M parameters, {spec.method} on {trainable}; "
        f"estimated peak memory {mem['estimatedBytes'] / 2**30:.2f} GiB"
        + (f" per GPU, sharded over {mem['shardedOver']}" if "shardedOver" in mem else "")
        + f" at {prep.precision} "
        f"(batch {spec.training.per_device_train_batch_size} x {spec.dataset.max_seq_length} "
        "tokens), compared with the GPU's memory when the GPU pod starts"
    )
    if prep.model_commit:
        text += f"; {spec.model.uri} at commit {prep.model_commit[:12]}"
    for warning in prep.warnings:
        text += f"; warning: {warning}"
    return text
