"""What a benchmark ran on, printed with its figures: CPU model and the flags that decide which
kernels torch picks (AVX2 only, or AVX-512 with native bf16), core count and load."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def machine_facts() -> dict[str, Any]:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags = set(re.findall(r"\w+", (re.search(r"^flags\s*:(.*)$", cpuinfo, re.M) or [""])[0]))
    return {
        "cpu_model": model.group(1).strip() if model else None,
        "cpu_flags": [f for f in FLAGS if f in flags],
        "native_bf16": bool({"avx512_bf16", "amx_bf16"} & flags),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        # set here to keep torch / oneDNN on AVX2 kernels on an AVX-512 machine
        "isa_caps": {
            k: os.environ[k]
            for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
            if k in os.environ
        },
    }
