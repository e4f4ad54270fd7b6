"""onnxruntime-genai's model builder as a Python call, with a pre-flight check of the input.

The builder dispatches on `config.architectures[0]` deep inside `create_model`; an unsupported
model only fails after the weights are loaded. `preflight` reads `config.json` first and refuses
such a model with the list of architectures the installed builder knows.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import json
import re
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from graft.api.optimize import PRECISIONS_BY_DEVICE
from graft_trainer.export.errors import ExportError

# What onnxruntime-genai 0.18's builder dispatches on; used only if its source cannot be read.
_KNOWN_ARCHITECTURES = (
    "ChatGLMForConditionalGeneration",
    "ChatGLMModel",
    "Ernie4_5ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
    "GraniteForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "NemotronForCausalLM",
    "OlmoForCausalLM",
    "PhiForCausalLM",
    "Phi3ForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "SmolLM3ForCausalLM",
)
# Multimodal and speech architectures the builder exports only in part: not for text jobs.
_NOT_TEXT = ("WhisperForConditionalGeneration",)


@functools.cache
def supported_architectures() -> tuple[str, ...]:
    """The `architectures[0]` values the installed model builder can export, sorted."""
    try:
        from onnxruntime_genai.models import builder

        source = inspect.getsource(builder.create_model)
    except (ImportError, OSError, TypeError):
        return tuple(sorted(_KNOWN_ARCHITECTURES))
    found = set(re.findall(r"config\.architectures\[0\]\s*==\s*\"(\w+)\"", source))
    return tuple(sorted((found or set(_KNOWN_ARCHITECTURES)) - set(_NOT_TEXT)))


def read_config(model_dir: Path, field: str) -> dict[str, object]:
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(
            field, f"{model_dir} is not a Hugging Face model directory (no config.json)"
        ) from None
    except json.JSONDecodeError as exc:
        raise ExportError(field, f"config.json of {model_dir} is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ExportError(field, f"config.json of {model_dir} is not an object")
    return config


def preflight(model_dir: Path, field: str = "spec.source.model") -> str:
    """The model's architecture, or `ExportError` naming the supported ones. Reads no weights."""
    config = read_config(model_dir, field)
    architectures = config.get("architectures")
    if not isinstance(architectures, list) or not architectures:
        raise ExportError(
            field,
            "config.json names no architectures; onnxruntime-genai exports "
            + ", ".join(supported_architectures()),
            reason="UnsupportedArchitecture",
        )
    arch = str(architectures[0])
    if arch not in supported_architectures():
        raise ExportError(
            field,
            f"architecture {arch} cannot be exported by onnxruntime-genai's model builder; "
            f"supported: {', '.join(supported_architectures())}",
            reason="UnsupportedArchitecture",
        )
    return arch


def check_target(device: str, precision: str, field: str = "spec.target") -> None:
    allowed = PRECISIONS_BY_DEVICE.get(device)
    if allowed is None:
        raise ExportError(
            f"{field}.device",
            f"unknown device {device!r}; choose one of {sorted(PRECISIONS_BY_DEVICE)}",
        )
    if precision not in allowed:
        raise ExportError(
            f"{field}.precision",
            f"{precision} does not run on {device}; choose one of {list(allowed)}",
            reason="UnsupportedPrecision",
        )


@dataclass
class BuildResult:
    out_dir: Path
    seconds: float
    log: str


class BuildFailed(RuntimeError):
    """The model builder raised; carries the tail of its output."""


def build(
    model_dir: Path,
    out_dir: Path,
    *,
    precision: str,
    device: str,
    adapter_dir: Path | None = None,
    nodes_to_exclude: Iterable[str] = (),
    extra_options: Mapping[str, str] | None = None,
) -> BuildResult:
    """Export `model_dir` (a Hugging Face directory) to an ONNX Runtime GenAI directory.

    With `adapter_dir` the LoRA stays as separate lora_A/lora_B MatMuls whose weights are
    initializers. `nodes_to_exclude` keeps the named MatMuls out of int4/int8 quantization.
    """
    from onnxruntime_genai.models import builder

    options = dict(extra_options or {})
    options.setdefault("hf_token", "false")
    if adapter_dir is not None:
        options["adapter_path"] = str(adapter_dir)
    excluded = list(nodes_to_exclude)
    if excluded:
        options["nodes_to_exclude"] = ",".join(excluded)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = io.StringIO()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="graft-builder-cache-") as cache:
        try:
            with contextlib.redirect_stdout(log):
                parsed = builder.parse_extra_options(
                    None,
                    str(model_dir),
                    str(out_dir),
                    precision,
                    device,
                    cache,
                    [f"{key}={value}" for key, value in options.items()],
                )
                builder.create_model(
                    None, str(model_dir), str(out_dir), precision, device, cache, **parsed
                )
        except Exception as exc:
            tail = log.getvalue()[-4000:]
            raise BuildFailed(
                f"model builder failed: {exc!r}\n--- builder output ---\n{tail}"
            ) from exc
    return BuildResult(out_dir=out_dir, seconds=time.perf_counter() - start, log=log.getvalue())
