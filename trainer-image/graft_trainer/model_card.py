"""The model card (README.md) of a published adapter or model, as the Hugging Face Hub renders it:
YAML front matter the Hub reads (base model, library, datasets, tags), then what a reader needs
to trust and reproduce the run: base and dataset with their commits or digests, the method and
hyper-parameters, metrics before and after, the spec's digest and the Graft version."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml

from graft_trainer import __version__

HYPER_PARAMETERS = (
    "maxSteps",
    "numEpochs",
    "learningRate",
    "lrScheduler",
    "warmupRatio",
    "perDeviceTrainBatchSize",
    "gradientAccumulationSteps",
    "weightDecay",
    "precision",
    "seed",
)


def spec_digest(spec: dict[str, Any]) -> str:
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


def hub_id(uri: str) -> str | None:
    return uri.removeprefix("hf://") if uri.startswith("hf://") else None


def render_model_card(
    *,
    name: str,
    namespace: str,
    spec: dict[str, Any],
    model_commit: str | None,
    dataset_digest: str,
    baseline: dict[str, float],
    final: dict[str, float],
    run: dict[str, Any],
) -> str:
    """README.md text for the weights a FineTuneJob (`spec` in its API form) produced."""
    model, dataset = spec["model"], spec["dataset"]
    method = spec.get("method", "lora")
    base = hub_id(model["uri"]) or model["uri"]
    front: dict[str, Any] = {
        "base_model": base,
        "library_name": "peft" if method != "full" else "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["graft", method] + (["lora", "peft"] if method != "full" else []),
    }
    if method != "full":
        front["base_model_relation"] = "adapter"
    if hub_id(dataset["uri"]):
        front["datasets"] = [hub_id(dataset["uri"])]
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {name}",
        "",
        f"{'A LoRA-family adapter' if method != 'full' else 'A fully fine-tuned model'} "
        f"trained with Graft {__version__} by the FineTuneJob `{namespace}/{name}`.",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{model['uri']}`"
        + (f" at commit `{model_commit}`" if model_commit else "")
        + " |",
        f"| dataset | `{dataset['uri']}` ({dataset_digest}) |",
        f"| method | {_method(spec)} |",
    ]
    training = spec.get("training") or {}
    for key in HYPER_PARAMETERS:
        if training.get(key) is not None:
            lines.append(f"| {key} | {training[key]} |")
    lines.append(f"| steps run | {run.get('finalStep')} (best {run.get('bestStep')}) |")
    lines += ["", "## Evaluation", "", "| metric | before | after |", "|---|---|---|"]
    for key in sorted(set(baseline) | set(final)):
        lines.append(f"| {key} | {_number(baseline.get(key))} | {_number(final.get(key))} |")
    lines += [
        "",
        "## Reproduce",
        "",
        f"The spec's digest is `{spec_digest(spec)}`; the full spec and the digest of every "
        "file are in `manifest.json` beside this card.",
        "",
    ]
    if method != "full":
        lines += [
            "```python",
            "from peft import AutoPeftModelForCausalLM",
            "",
            'model = AutoPeftModelForCausalLM.from_pretrained("PATH_OR_REPO_OF_THIS_ADAPTER")',
            "```",
            "",
        ]
    return "\n".join(lines)


def _method(spec: dict[str, Any]) -> str:
    method = spec.get("method", "lora")
    lora = spec.get("lora") or {}
    if method == "full" or not lora:
        return method
    parts = [f"r={lora.get('r')}", f"alpha={lora.get('alpha')}"]
    if lora.get("targetModules"):
        parts.append("targets " + ", ".join(lora["targetModules"]))
    return f"{method} ({'; '.join(parts)})"


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"
