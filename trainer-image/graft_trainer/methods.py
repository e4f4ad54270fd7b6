"""Load the base model and tokenizer and apply the method: lora, qlora, dora or full."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from graft.api.finetune import FineTuneJobSpec
from graft_trainer.errors import GraftInputError

# Attention projections per architecture (config.model_type), the usual LoRA targets.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "gemma3_text": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "smollm3": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "olmo2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense"],
    "phi3": ["qkv_proj", "o_proj"],
    "gpt2": ["c_attn", "c_proj"],
    "gpt_neox": ["query_key_value", "dense"],
    "falcon": ["query_key_value", "dense"],
    "gpt_bigcode": ["c_attn", "c_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "bloom": ["query_key_value", "dense"],
}


def check_causal_lm(model_dir: Path, trust_remote_code: bool) -> Any:
    """The model's config, or GraftInputError when it is not a causal language model."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not (model_dir / "config.json").is_file():
        raise GraftInputError(f"model {model_dir}: no config.json (expected a transformers model)")
    try:
        config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise GraftInputError(f"model {model_dir}: {str(exc).splitlines()[0]}") from None
    architectures = list(getattr(config, "architectures", None) or [])
    causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        not architectures or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    )
    if not causal and not (trust_remote_code and getattr(config, "auto_map", None)):
        arch = ", ".join(architectures) or config.model_type
        raise GraftInputError(
            f"model {model_dir.name} is a {arch}; expected a causal language model "
            "(an ...ForCausalLM architecture)"
        )
    return config


def load_tokenizer(model_dir: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise GraftInputError(
            f"model {model_dir.name}: cannot load its tokenizer ({exc})"
        ) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of the model's linear layers (what target_modules can name)."""
    import torch

    names = set()
    for full, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, torch.nn.Linear) or kind in ("Linear4bit", "Linear8bitLt", "Conv1D"):
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names)


def module_leaf_names(model: Any) -> set[str]:
    return {full.rsplit(".", 1)[-1] for full, _ in model.named_modules() if full}


def default_targets(model: Any) -> list[str]:
    targets = DEFAULT_TARGETS.get(model.config.model_type)
    available = set(linear_module_names(model))
    if targets and all(t in available for t in targets):
        return targets
    return [n for n in linear_module_names(model) if n not in ("lm_head", "embed_out", "score")]


def check_targets(model: Any, targets: list[str], modules_to_save: list[str]) -> None:
    linear = linear_module_names(model)
    missing = [t for t in targets if t not in linear]
    if missing:
        raise GraftInputError(
            f"lora.targetModules {missing} not in the model; its linear modules are: "
            f"{', '.join(linear)}"
        )
    leaves = module_leaf_names(model)
    missing = [m for m in modules_to_save if m not in leaves]
    if missing:
        raise GraftInputError(
            f"lora.modulesToSave {missing} not in the model; candidates: "
            f"{', '.join(sorted(n for n in leaves if not n.isdigit()))}"
        )


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX) and torch may use
    it. Elsewhere bf16 matrix products are emulated, about 100x slower than fp32."""
    import torch

    # ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA can hold torch and oneDNN to AVX2 kernels.
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2"):
        return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa and "AMX" not in isa and "BF16" not in isa and isa != "ALL":
        return False
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


# Why the warning names a factor: bf16 matmul measured ~1 GFLOP/s against 135 GFLOP/s in fp32
# (torch, 2 threads) on an AVX2-only EPYC.
SLOW_BF16_WARNING = (
    "precision bf16 on a CPU without native bf16 (no AVX-512 BF16 or AMX): matrix products are "
    "emulated, typically about 100x slower than fp32; use precision auto or fp32 on this node"
)


def resolve_precision(precision: str, device: str) -> str:
    """bf16, fp16 or fp32 for this hardware; GraftInputError for what it cannot do.

    auto is bf16 on GPUs that have it (else fp16) and on CPUs with native bf16, else fp32."""
    import torch

    if device == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if precision == "auto":
            return "bf16" if bf16 else "fp16"
        if precision == "bf16" and not bf16:
            raise GraftInputError("precision bf16 is not supported on this GPU; use fp16 or auto")
        return precision
    if precision == "fp16":
        raise GraftInputError("precision fp16 needs a GPU; use auto, bf16 or fp32 on the CPU")
    if precision == "auto":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return precision


def precision_warnings(spec: FineTuneJobSpec, device: str) -> list[str]:
    """Warnings for bf16 the CPU can only emulate, asked for explicitly: `training.precision`,
    or QLoRA's `quantization.computeDtype`. It runs, slowly: a spec stays portable across node
    pools, so it is not refused."""
    if device != "cpu" or cpu_has_native_bf16():
        return []
    out = []
    if spec.training.precision == "bf16":
        out.append(SLOW_BF16_WARNING)
    q = spec.quantization
    if spec.method == "qlora" and q is not None and q.compute_dtype == "bfloat16":
        out.append(
            "quantization.computeDtype bfloat16 on a CPU without native bf16: the 4-bit "
            "matrix products are emulated, typically about 100x slower; use float32 on this node"
        )
    return out


def autocast_dtype(precision: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def check_quantization(spec: FineTuneJobSpec, device: str) -> None:
    q = spec.quantization
    if spec.method != "qlora" or q is None:
        return
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:
        raise GraftInputError(
            f"method qlora needs bitsandbytes, which failed to load: {exc}"
        ) from None
    if device == "cpu" and q.bits == 8:
        raise GraftInputError(
            "quantization bits 8 is not supported on the CPU by bitsandbytes; use bits 4 "
            "(nf4/fp4) or a GPU"
        )
    if device == "cpu" and q.compute_dtype == "float16":
        raise GraftInputError(
            "quantization computeDtype float16 is not supported on the CPU; use bfloat16 or float32"
        )


def load_model(spec: FineTuneJobSpec, model_dir: Path, device: str) -> Any:
    """The model ready to train: quantized and/or wrapped with a PEFT adapter per the method."""
    import torch
    from transformers import AutoModelForCausalLM

    trust = spec.model.trust_remote_code
    kwargs: dict[str, Any] = {"trust_remote_code": trust, "dtype": torch.float32}
    if spec.method == "qlora":
        from transformers import BitsAndBytesConfig

        q = spec.quantization
        assert q is not None
        check_quantization(spec, device)
        compute = getattr(torch, q.compute_dtype)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=q.bits == 4,
            load_in_8bit=q.bits == 8,
            bnb_4bit_quant_type=q.type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=compute,
        )
        # The current GPU: each data-parallel process has its own (parallel.accelerator).
        kwargs["device_map"] = {"": torch.cuda.current_device() if device == "cuda" else "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except GraftInputError:
        raise
    except (ValueError, OSError) as exc:
        raise GraftInputError(
            f"cannot load model {model_dir.name}: {str(exc).splitlines()[0]}"
        ) from None
    if spec.method != "qlora":
        model.to(device)
    if spec.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if spec.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    lora = spec.lora
    assert lora is not None
    targets = lora.target_modules or default_targets(model)
    check_targets(model, targets, lora.modules_to_save)
    if spec.method == "qlora":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=spec.training.gradient_checkpointing
        )
    elif spec.training.gradient_checkpointing:
        model.enable_input_require_grads()
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        modules_to_save=lora.modules_to_save or None,
        use_dora=spec.method == "dora",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def trainable_state(model: Any) -> dict[str, Any]:
    """The trainable tensors by name (adapter weights, or every weight for full), on the CPU."""
    return {
        n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad
    }


def load_trainable_state(model: Any, state: dict[str, Any]) -> None:
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device))
