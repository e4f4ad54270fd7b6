"""precision: auto follows the CPU's native bf16; an explicit bf16 it can only emulate warns."""

from __future__ import annotations

import pytest
import torch

from graft.api.finetune import FineTuneJobSpec
from graft_trainer import methods

BF16_CPU = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
AVX2_CPU = "flags\t\t: fpu sse2 avx2 fma\n"
AMX_CPU = "flags\t\t: fpu avx2 avx512f amx_tile amx_bf16 amx_int8\n"


@pytest.fixture
def avx512_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch as it reports itself on an AVX-512 machine with no ISA cap in the environment."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)


@pytest.mark.usefixtures("avx512_torch")
def test_native_bf16_needs_the_cpu_flag() -> None:
    assert methods.cpu_has_native_bf16(BF16_CPU)
    assert methods.cpu_has_native_bf16(AMX_CPU)
    assert not methods.cpu_has_native_bf16(AVX2_CPU)
    # a flag name that merely contains the text is not the flag
    assert not methods.cpu_has_native_bf16("flags : avx512_bf16x\n")


@pytest.mark.usefixtures("avx512_torch")
def test_kernels_held_to_avx2_have_no_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not methods.cpu_has_native_bf16(BF16_CPU)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert methods.cpu_has_native_bf16(BF16_CPU)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert not methods.cpu_has_native_bf16(BF16_CPU)


def spec(**overrides: object) -> FineTuneJobSpec:
    body: dict[str, object] = {
        "model": {"uri": "file:///m"},
        "dataset": {"uri": "file:///d.jsonl", "textTemplate": "{a}"},
    }
    body.update(overrides)
    return FineTuneJobSpec.model_validate(body)


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_follows_the_cpu(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(methods, "cpu_has_native_bf16", lambda cpuinfo=None: native)
    assert methods.resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert methods.resolve_precision("fp32", "cpu") == "fp32"
    assert methods.resolve_precision("bf16", "cpu") == "bf16"
    warnings = methods.precision_warnings(spec(training={"precision": "bf16"}), "cpu")
    if native:
        assert warnings == []
    else:
        assert len(warnings) == 1 and "100x slower" in warnings[0] and "fp32" in warnings[0]
    # auto and fp32 never warn: they never pick emulated bf16
    for precision in ("auto", "fp32"):
        assert methods.precision_warnings(spec(training={"precision": precision}), "cpu") == []


@pytest.mark.parametrize("native", [True, False])
def test_qlora_bf16_compute_dtype_warns_where_emulated(
    monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    monkeypatch.setattr(methods, "cpu_has_native_bf16", lambda cpuinfo=None: native)
    qlora = {"method": "qlora", "quantization": {"bits": 4, "computeDtype": "bfloat16"}}
    warnings = methods.precision_warnings(spec(**qlora), "cpu")
    if native:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warnings[0].startswith("quantization.computeDtype bfloat16")
    qlora["quantization"] = {"bits": 4, "computeDtype": "float32"}
    assert methods.precision_warnings(spec(**qlora), "cpu") == []


def test_fp16_on_the_cpu_is_refused() -> None:
    from graft_trainer.errors import GraftInputError

    with pytest.raises(GraftInputError, match="fp16 needs a GPU"):
        methods.resolve_precision("fp16", "cpu")
