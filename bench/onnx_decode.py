"""Decode speed: int4 ONNX (onnxruntime-genai) vs PyTorch fp32, and the cost of a runtime adapter.

Builds a Llama of about 24M parameters (no download), a random rank-16 LoRA on q/k/v/o, and
measures in one run, on the same machine and the same prompt:

  1. PyTorch fp32 `generate` (greedy, KV cache) decode tokens/s;
  2. the stock int4 export (onnxruntime-genai model builder) decode tokens/s  -> speed-up;
  3. the AdapterBundle export (`run_bundle`, int4): the graph with LoRA inputs with the adapter
     active, and with none active, against the plain base export             -> overheads.

Decode speed excludes the prompt (prefill); each figure is the median of interleaved rounds.

    .venv/bin/python bench/onnx_decode.py [--work-dir DIR] [--tokens 128] [--rounds 5] [--smoke]

`--layouts` also serves other layouts of the LoRA branches (`bench/adapter_layouts.py`: one A
per packed projection, float16 adapter weights) in the same rounds, each with its overhead over
the plain base and whether it generates the shipped layout's tokens. `--cpu-time` counts the
bundle's and the layouts' tokens per CPU second of the process with one intra-op thread instead
of per wall-clock second: on a shared machine the wall-clock ratios swing by tens of percent.

`--smoke` (a 2-layer, 64-wide model, 8 tokens, one round, with `--layouts --cpu-time`) is what
`make test` runs, so the benchmark cannot rot; its figures mean nothing. Goals: int4 >= 10x
PyTorch fp32; adapter overhead <= 5%; no cost when no adapter is active.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine_facts

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "<|user|>\nThe movie was great and the food was lovely<|end|>\n<|assistant|>\n"


def build_model(work: Path, hidden: int, layers: int) -> Path:
    from graft_trainer.testkit import build_tiny_llama

    model = work / f"llama-h{hidden}-l{layers}"
    if not (model / "config.json").is_file():
        heads = max(4, hidden // 64)
        # decode speed does not depend on what the weights learned: a short pretraining only
        # teaches the chat format (the testkit's full one is sized for its 64-wide model)
        build_tiny_llama(
            model,
            seed=0,
            hidden_size=hidden,
            layers=layers,
            heads=heads,
            kv_heads=heads // 2,
            pretrain_steps=60,
        )
    return model


def build_adapter(model: Path, work: Path, rank: int = 16) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = model.with_name(f"{model.name}-lora-r{rank}")
    if (out / "adapter_config.json").is_file():
        return out
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,  # random A and B: a non-trivial adapter
    )
    get_peft_model(base, config).save_pretrained(str(out))
    return out


def parameters(model: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in model.glob("*.safetensors"):
        with safe_open(str(path), framework="numpy") as handle:
            for key in handle.keys():  # noqa: SIM118
                shape = handle.get_slice(key).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                total += count
    return total


def torch_decode_tps(model_dir: Path, tokens: int) -> Callable[[], float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = tokenizer(PROMPT, return_tensors="pt")

    def timed(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                **ids,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        return time.perf_counter() - start

    timed(4)  # warm-up

    def measure() -> float:
        # Decode only: the time of n tokens minus the time of the first (the prefill).
        return (tokens - 1) / max(1e-9, timed(tokens) - timed(1))

    return measure


def genai_decode_tps(
    model_dir: Path,
    tokens: int,
    adapters: dict[str, Path] | None = None,
    adapter: str | None = None,
    filename: str | None = None,
) -> Callable[[], float]:
    from graft_trainer.export.validate import GenaiModel

    model = GenaiModel(model_dir, adapters, filename=filename)
    model.decode_tokens_per_second(PROMPT, 8, adapter=adapter, repeats=1)  # warm-up
    return lambda: model.decode_tokens_per_second(PROMPT, tokens, adapter=adapter, repeats=1)


def genai_cpu_decode_tps(
    model_dir: Path,
    tokens: int,
    adapters: dict[str, Path] | None = None,
    adapter: str | None = None,
    filename: str | None = None,
) -> Callable[[], float]:
    """Decode tokens per CPU second of this process, onnxruntime with one intra-op thread:
    the work a token costs, which other tenants of a shared machine disturb far less than
    they disturb wall-clock time (`--cpu-time`)."""
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    decoder: dict[str, Any] = {"session_options": {"intra_op_num_threads": 1}}
    if filename is not None:
        decoder["filename"] = filename
    config.overlay(json.dumps({"model": {"decoder": decoder}}))
    model = og.Model(config)
    loaded = None
    if adapters:
        loaded = og.Adapters(model)
        for name, path in adapters.items():
            loaded.load(str(path), name)
    ids = og.Tokenizer(model).encode(PROMPT)

    def measure(n: int) -> float:
        params = og.GeneratorParams(model)
        total = len(ids) + n
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        generator = og.Generator(model, params)
        if adapter is not None:
            generator.set_active_adapter(loaded, adapter)
        generator.append_tokens(ids)
        generator.generate_next_token()  # the prefill
        start = time.process_time()
        for _ in range(n - 1):
            generator.generate_next_token()
        return (n - 1) / max(1e-9, time.process_time() - start)

    measure(8)  # warm-up
    return lambda: measure(tokens)


def same_tokens(
    model_dir: Path, adapters: dict[str, Path], filename: str | None, tokens: int
) -> list[int]:
    """The greedy tokens generated with adapter 'lora' active."""
    from graft_trainer.export.validate import GenaiModel

    model = GenaiModel(model_dir, adapters, filename=filename)
    return model.generate(PROMPT, tokens, adapter="lora").tokens


def interleaved(measures: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Samples of each measure, taken in turn, round after round (drift hits all alike)."""
    samples: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            samples[name].append(measure())
    return samples


def ratio(samples: dict[str, list[float]], fast: str, slow: str) -> float:
    """Median over rounds of fast/slow, each round's pair measured back to back."""
    return statistics.median(f / s for f, s in zip(samples[fast], samples[slow], strict=True))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=None, help="keep models here (reused)")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size (512: 24M params)")
    parser.add_argument("--layers", type=int, default=10, help="decoder layers")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (q/k/v/o)")
    parser.add_argument(
        "--skip-pytorch", action="store_true", help="measure only the adapter overhead"
    )
    parser.add_argument(
        "--layouts",
        action="store_true",
        help="also measure other LoRA layouts (bench/adapter_layouts.py) in the same rounds",
    )
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="adapter overheads in CPU time per token, one intra-op thread (shared machines)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shape, 8 tokens, one round")
    args = parser.parse_args(argv)
    if args.smoke:
        args.hidden, args.layers, args.rank, args.tokens, args.rounds = 64, 2, 4, 8, 1
        args.layouts = args.cpu_time = True  # the smoke runs every code path

    from graft_trainer.export import builder, stages

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="graft-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(work, args.hidden, args.layers)
    adapter = build_adapter(model, work, args.rank)

    int4 = model.with_name(model.name + "-int4")
    if not (int4 / "genai_config.json").is_file():
        builder.build(model, int4, precision="int4", device="cpu")
    bundle_dir = model.with_name(f"{model.name}-bundle-r{args.rank}")
    if not (bundle_dir / "manifest.json").is_file():
        stages.run_bundle(
            {
                "baseModel": {"uri": "file:///bench"},
                "adapters": [{"name": "lora", "uri": "file:///bench/lora"}],
                "target": {"device": "cpu", "precision": "int4"},
            },
            base_model_dir=model,
            adapters=[stages.BundleAdapterInput("lora", adapter)],
            out_dir=bundle_dir,
            measure_overhead=False,
        )
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    files = {"lora": bundle_dir / "adapters" / "lora.onnx_adapter"}
    base_dir, base_file = stages.plain_base_location(bundle_dir, manifest)

    bundle_tps = genai_cpu_decode_tps if args.cpu_time else genai_decode_tps
    layouts: dict[str, Callable[[], float]] = {}
    same: dict[str, bool] = {}
    if args.layouts:
        from bench.adapter_layouts import LAYOUTS, build_layout
        from graft_trainer.export import bundle

        peft = bundle.read_peft_adapter(adapter, "bench")
        shapes = bundle.base_linear_shapes(model)
        shipped = same_tokens(bundle_dir / "model", files, None, args.tokens)
        for layout in LAYOUTS:
            graph, file = build_layout(base_dir, layout, peft, shapes, base_file)
            layouts[f"layout_{layout}"] = bundle_tps(
                base_dir, args.tokens, {"lora": file}, "lora", filename=graph
            )
            # the greedy tokens it generates with the adapter, against the shipped layout's
            same[layout] = same_tokens(base_dir, {"lora": file}, graph, args.tokens) == shipped

    speed = interleaved(
        {
            "onnx_int4": genai_decode_tps(int4, args.tokens),
            **({} if args.skip_pytorch else {"pytorch_fp32": torch_decode_tps(model, args.tokens)}),
        },
        args.rounds,
    )
    adapters = interleaved(
        {
            "bundle_base": bundle_tps(base_dir, args.tokens, filename=base_file),
            "bundle_adapter_active": bundle_tps(bundle_dir / "model", args.tokens, files, "lora"),
            "bundle_no_adapter": bundle_tps(bundle_dir / "model", args.tokens, files),
            **layouts,
        },
        args.rounds,
    )
    layout_samples = {k: adapters.pop(k) for k in layouts}
    medians = {k: round(statistics.median(v), 1) for k, v in {**speed, **adapters}.items()}
    result = {
        "parameters": parameters(model),
        "lora": {"rank": args.rank, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "tokens": args.tokens,
        "rounds": args.rounds,
        "machine": machine_facts(),
        "smoke": args.smoke,
        # what the bundle_* and layout figures count: tokens per wall-clock second (onnxruntime's
        # default threads), or per CPU second of the process with one intra-op thread
        "bundle_clock": "cpu" if args.cpu_time else "wall",
        "decode_tokens_per_second": medians,
        "int4_speedup_vs_pytorch_fp32": (
            round(ratio(speed, "onnx_int4", "pytorch_fp32"), 2) if "pytorch_fp32" in speed else None
        ),
        "adapter_overhead": round(ratio(adapters, "bundle_base", "bundle_adapter_active") - 1, 4),
        "lora_graph_no_adapter_overhead": round(
            ratio(adapters, "bundle_base", "bundle_no_adapter") - 1, 4
        ),
        "no_adapter_served_by": manifest.get("noAdapter", {}),
    }
    if layout_samples:
        # Each layout's overhead over the plain base, paired round by round like the above.
        result["layouts"] = {
            key.removeprefix("layout_"): {
                "decode_tokens_per_second": round(statistics.median(samples), 1),
                "adapter_overhead": round(
                    ratio({**adapters, key: samples}, "bundle_base", key) - 1, 4
                ),
                "same_tokens_as_shipped": same[key.removeprefix("layout_")],
            }
            for key, samples in layout_samples.items()
        }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
