"""Trainer throughput on realistic shapes: instruction data, completion-only loss, big vocabularies.

Models built from configs with random weights (no Hub access): a SmolLM2-135M-shaped Llama
(vocab 49,152, hidden 576, 30 layers, 9/3 heads, intermediate 1536, tied embeddings) and a
Qwen2.5-0.5B-shaped Qwen2 (vocab 151,936, hidden 896, 14/2 heads, intermediate 4864, tied;
`--qwen-layers` of its 24 layers, said in the output). Synthetic instruction records: prompts of
30-300 words, completions of 3-60 words, the loss on completion tokens only; LoRA r16 on every
linear layer of the decoder (q/k/v/o/gate/up/down). Contenders, each in a fresh process (so
peak RSS is its own), same batch (4 records), steps, lr:

  (a) plain:  transformers.Trainer + peft, completion-only labels, padded batches, defaults
  (b) trl:    TRL's SFTTrainer on prompt/completion records (completion_only_loss=True),
              padding_free=True (each batch one row, no padding; batches are the same records
              as (a)'s), its fused LM head; bf16 only with --precision auto on native-bf16 CPUs
  graft:      the Graft engine (FineTuneJob spec, completionOnly): flattened batches with
              per-text attention, the LM head and loss at target positions only, chunked

    .venv/bin/python bench/trainer_realistic.py [--models smollm,qwen] [--steps 6] [--rounds 2]
        [--qwen-layers 6] [--precision fp32|auto] [--json F]
    .venv/bin/python bench/trainer_realistic.py --smoke       # tiny shapes, seconds

`--smoke` (what `make test` runs, through bench/gpu_check.sh --dry-run too) keeps every code
path with the least work: 2-layer 64-wide models, 2 steps of 4 records of 6-30 words (the
measured runs: 30-300), a 0.2 s matrix-product peak. Its figures mean nothing.

With --rounds N every contender runs N times, the order rotated between rounds; the summary's
ratios are medians of the ratios within each round (a shared machine's load drifts between
runs, so figures are only compared with those of the same round).

Reports tokens/s over training wall time (`tokens`: real, non-pad tokens; `target_tokens`: those
the loss is on), peak RSS (and peak GPU memory on CUDA), final loss (mean of the last 3 steps'
losses) and a FLOP rate: 4 x (decoder linear parameters) per token (forward + the input-gradient
of frozen weights; LoRA's own and attention's matmuls not counted) + 4 x vocab x hidden per target
token (the LM head where the loss needs it). The same count for every contender, so it ranks
them like tokens/s; it is set against a matrix-product peak measured in the same run (fp32 on
the CPU, bf16 on CUDA). `--device cuda --methods lora,qlora --models qwen1.5b` is what
bench/gpu_check.sh runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine_facts

SEED = 1234
LR = 2.0e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name: (architecture, vocab, hidden, layers, heads, kv heads, intermediate, real layers)
SHAPES: dict[str, tuple[str, int, int, int, int, int, int, int]] = {
    "smollm": ("llama", 49152, 576, 30, 9, 3, 1536, 30),
    "qwen": ("qwen2", 151936, 896, 24, 14, 2, 4864, 24),
    "qwen1.5b": ("qwen2", 151936, 1536, 28, 12, 2, 8960, 28),
    # smoke: the same two architectures, tiny (a vocabulary still larger than the tokenizer's)
    "smoke-smollm": ("llama", 2048, 64, 2, 4, 2, 128, 2),
    "smoke-qwen": ("qwen2", 4096, 64, 2, 4, 2, 128, 2),
}
CONTENDERS = ("plain", "trl", "graft")
# words per record: (prompt fewest, most, completion fewest, most); the smoke's are short
WORDS = (30, 300, 3, 60)
SMOKE_WORDS = (6, 30, 3, 10)


# ---------------------------------------------------------------- model and data


def words(rng: random.Random) -> list[str]:
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "be", "do", "fa", "gu", "ha", "ji"]
    return sorted(
        {"".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(4000)}
    )


def records(n: int, seed: int, lengths: tuple[int, int, int, int] = WORDS) -> list[dict[str, str]]:
    rng = random.Random(seed)
    vocab = words(rng)
    p_low, p_high, c_low, c_high = lengths
    out = []
    for _ in range(n):
        p = " ".join(rng.choice(vocab) for _ in range(rng.randint(p_low, p_high)))
        c = " ".join(rng.choice(vocab) for _ in range(rng.randint(c_low, c_high)))
        out.append({"prompt": f"### Instruction:\n{p}\n### Response:\n", "completion": c})
    return out


def build(
    work: Path,
    shape: str,
    layers: int,
    n_records: int,
    tok_vocab: int,
    device: str = "cpu",
    lengths: tuple[int, int, int, int] = WORDS,
) -> dict[str, Any]:
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    arch, vocab, hidden, _, heads, kv, inter, real = SHAPES[shape]
    rows = records(n_records, SEED, lengths)
    data = work / "instructions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [r["prompt"] + r["completion"] for r in rows],
        trainers.BpeTrainer(
            vocab_size=tok_vocab,
            special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    model_dir = work / "model"
    fast.save_pretrained(str(model_dir))
    config = transformers.AutoConfig.for_model(
        arch,
        vocab_size=vocab,  # the model's; the tokenizer uses its first ids
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=fast.pad_token_id,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    torch.manual_seed(SEED)
    with torch.device(device):  # a 1.5B model initializes in seconds on a GPU
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(model_dir))
    parameters = sum(p.numel() for p in model.parameters())
    del model
    head_dim = hidden // heads
    linear = layers * (
        hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2 + 3 * hidden * inter
    )
    return {
        "model": model_dir,
        "data": data,
        "shape": {
            "architecture": arch,
            "vocab": vocab,
            "hidden": hidden,
            "layers": layers,
            "layers_of_real_model": real,
            "heads": heads,
            "kv_heads": kv,
            "intermediate": inter,
            "tied_embeddings": True,
            "parameters": parameters,
            "decoder_linear_parameters": linear,
            "tokenizer_vocab": len(fast),
        },
    }


def matmul_peak(device: str, seconds: float = 2.0) -> float:
    """Best GFLOP/s of a square matrix product (fp32 on the CPU, bf16 on CUDA)."""
    import torch

    n = 4096 if device == "cuda" else 1024
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10 if device == "cuda" else 1):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / (10 if device == "cuda" else 1)
        best = max(best, 2 * n**3 / dt / 1e9)
    return best


# ---------------------------------------------------------------- contenders (child process)


def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"
    )


def load_base(model_dir: Path, method: str, device: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    if method == "qlora":
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if device == "cuda" else torch.float32
        return AutoModelForCausalLM.from_pretrained(
            str(model_dir),
            dtype=torch.float32,
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute,
            ),
            device_map={"": 0 if device == "cuda" else "cpu"},
        )
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


class Counter:
    """Counts real and target tokens of every training forward (a pre-hook on the model)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.targets = 0
        self.largest = 0  # tokens of the largest micro-batch (what sets peak activation memory)

    def hook(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if not module.training:
            return
        ids, mask, labels = (
            kwargs.get("input_ids"),
            kwargs.get("attention_mask"),
            kwargs.get("labels"),
        )
        if ids is None and args:
            ids = args[0]
        tokens = int(mask.sum()) if mask is not None else int(ids.numel())
        self.tokens += tokens
        self.largest = max(self.largest, int(ids.numel()))  # padded: pads take memory too
        if labels is not None:
            self.targets += int((labels[:, 1:] != -100).sum())


def run_hf(
    kind: str,
    model_dir: Path,
    data: Path,
    steps: int,
    batch: int,
    bf16: bool,
    method: str,
    device: str,
) -> dict[str, Any]:
    import datasets
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    model = load_base(model_dir, method, device)
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    elif device == "cuda":
        model.to("cuda")
    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    common: dict[str, Any] = dict(
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=LR,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=SEED,
        use_cpu=device != "cuda",
        lr_scheduler_type="cosine",
        warmup_steps=1,
        dataloader_num_workers=0,
        bf16=bf16,
    )
    counter = Counter()
    with tempfile.TemporaryDirectory() as out:
        if kind == "trl":
            from trl import SFTConfig, SFTTrainer

            args = SFTConfig(
                output_dir=out,
                completion_only_loss=True,
                padding_free=True,
                max_length=None,  # padding-free without packing enforces no length
                **common,
            )
            trainer: Any = SFTTrainer(
                model=model,
                args=args,
                train_dataset=datasets.Dataset.from_list(rows),
                processing_class=tok,
                peft_config=lora_config(),
                callbacks=[Losses()],
            )
        else:
            model = get_peft_model(model, lora_config())

            def encode(r: dict[str, str]) -> dict[str, Any]:
                p = tok(r["prompt"])["input_ids"]
                c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                return {"input_ids": p + c, "labels": [-100] * len(p) + c}

            ds = datasets.Dataset.from_list(rows).map(
                encode, remove_columns=["prompt", "completion"]
            )

            def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
                width = max(len(f["input_ids"]) for f in features)
                pad = tok.pad_token_id

                def padded(key: str, fill: int) -> Any:
                    return torch.tensor([f[key] + [fill] * (width - len(f[key])) for f in features])

                return {
                    "input_ids": padded("input_ids", pad),
                    "labels": padded("labels", -100),
                    "attention_mask": torch.tensor(
                        [
                            [1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"]))
                            for f in features
                        ]
                    ),
                }

            trainer = Trainer(
                model=model,
                args=TrainingArguments(output_dir=out, **common),
                train_dataset=ds,
                data_collator=collate,
                callbacks=[Losses()],
            )
        trainer.model.register_forward_pre_hook(counter.hook, with_kwargs=True)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    return {
        "largest_batch_tokens": counter.largest,
        "tokens": counter.tokens,
        "target_tokens": counter.targets,
        "seconds": seconds,
        "losses": losses,
    }


def run_graft(
    model_dir: Path, data: Path, steps: int, batch: int, bf16: bool, method: str, device: str
) -> dict[str, Any]:
    from graft.api.finetune import FineTuneJobSpec
    from graft_trainer import data as D
    from graft_trainer.engine import Engine, JobIdentity
    from graft_trainer.reporting import NullReporter

    spec_dict: dict[str, Any] = {
        "model": {"uri": f"file://{model_dir}"},
        "dataset": {
            "uri": f"file://{data}",
            "textTemplate": "{prompt}{completion}",
            "completionOnly": True,
            "maxSeqLength": 2048,
        },
        "method": method,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": TARGETS},
        "training": {
            "maxSteps": steps,
            "learningRate": LR,
            "perDeviceTrainBatchSize": batch,
            "loggingSteps": 1,
            "saveSteps": 10**6,
            "seed": SEED,
            "lrScheduler": "cosine",
            "warmupRatio": 0.01,
            "precision": "bf16" if bf16 else "fp32",
        },
    }
    if method == "qlora":
        spec_dict["quantization"] = {
            "bits": 4,
            "type": "nf4",
            "doubleQuant": True,
            "computeDtype": "bfloat16" if device == "cuda" else "float32",
        }
    spec = FineTuneJobSpec.model_validate(spec_dict)
    # The engine reports tokens, not targets: count the targets of the batches it draws.
    targets = {"n": 0, "largest": 0}
    draw = D.TrainData.batches

    def counting(self: Any, *a: Any, **k: Any) -> Any:
        for i, b in draw(self, *a, **k):
            targets["n"] += b.target_tokens
            targets["largest"] = max(targets["largest"], sum(map(len, b.input_ids)))
            yield i, b

    D.TrainData.batches = counting  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as out:
        result = Engine(spec, JobIdentity("bench"), f"file://{out}/", NullReporter()).run()
        run = json.loads((Path(out) / "metrics.json").read_text())["run"]
    losses = [h["train_loss"] for h in result.history if "train_loss" in h]
    return {
        "largest_batch_tokens": targets["largest"],
        "tokens": run["tokens"],
        "target_tokens": targets["n"],
        "seconds": run["trainSeconds"],
        "losses": losses,
    }


def child(args: argparse.Namespace) -> None:
    from graft_trainer.allocator import allocator_in_use, restart_with_preferred_allocator

    if args.child == "graft":
        restart_with_preferred_allocator()  # as the trainer's commands do (tcmalloc)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model_dir, data = Path(args.model), Path(args.data)
    if args.child == "graft":
        out = run_graft(
            model_dir, data, args.steps, args.batch, args.bf16, args.method, args.device
        )
    else:
        out = run_hf(
            args.child, model_dir, data, args.steps, args.batch, args.bf16, args.method, args.device
        )
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["allocator"] = allocator_in_use()
    if args.device == "cuda":
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        out["peak_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved()
    print("RESULT " + json.dumps(out))


# ---------------------------------------------------------------- parent


def run_contender(
    name: str, paths: dict[str, Any], args: argparse.Namespace, method: str, bf16: bool
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        name,
        "--model",
        str(paths["model"]),
        "--data",
        str(paths["data"]),
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--method",
        method,
        "--device",
        args.device,
    ] + (["--bf16"] if bf16 else [])
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"{name} ({method}) failed:\n{proc.stderr[-3000:]}")
    r: dict[str, Any] = json.loads(line[-1][7:])
    return r


def figures(
    r: dict[str, Any], shape: dict[str, Any], peak_gflops: float, nominal: float | None = None
) -> None:
    r["tokens_per_second"] = r["tokens"] / r["seconds"]
    r["target_tokens_per_second"] = r["target_tokens"] / r["seconds"]
    tail = r["losses"][-3:]
    r["final_loss"] = sum(tail) / len(tail) if tail else float("nan")
    flops = (
        4 * shape["decoder_linear_parameters"] * r["tokens"]
        + 4 * shape["vocab"] * shape["hidden"] * r["target_tokens"]
    )
    r["gflops_per_second"] = flops / r["seconds"] / 1e9
    r["fraction_of_matmul_peak"] = r["gflops_per_second"] / peak_gflops
    if nominal:
        r["mfu_of_nominal_peak"] = r["gflops_per_second"] / (nominal * 1000)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="smollm,qwen")
    parser.add_argument("--qwen-layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--precision", choices=["fp32", "auto"], default="fp32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--methods", default="lora")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--json")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 2 steps (seconds)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="lora", help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    if args.smoke:  # every code path, the least work: one batch per step
        args.steps = 2
        args.records = args.steps * args.batch
        args.models = ",".join("smoke-" + m.removeprefix("smoke-") for m in args.models.split(","))
        args.models = args.models.replace("smoke-qwen1.5b", "smoke-qwen")
    if args.device == "cuda":
        import torch

        bf16 = args.precision == "auto" and torch.cuda.is_bf16_supported()
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer-image"))
        from graft_trainer.methods import cpu_has_native_bf16

        bf16 = args.precision == "auto" and cpu_has_native_bf16()
    contenders = [c for c in args.contenders.split(",") if c]
    peak = matmul_peak(args.device, 0.2 if args.smoke else 2.0)
    nominal = nominal_peak_tflops(args.device)
    report: dict[str, Any] = {
        "machine": machine_facts(),
        "device": args.device,
        "precision": "bf16" if bf16 else "fp32",
        "steps": args.steps,
        "batch": args.batch,
        "rounds": args.rounds,
        "matmul_peak_gflops": round(peak, 1),
        "matmul_peak_dtype": "bf16" if args.device == "cuda" else "fp32",
        "nominal_peak_tflops": nominal,
        "tokens_per_second_counts": "real (non-pad) tokens; target_tokens_per_second: tokens the loss is on",
        "flops_count": "4 x decoder linear parameters per token + 4 x vocab x hidden per target token",
        "models": {},
    }
    if args.device == "cuda":
        import torch

        report["gpu"] = torch.cuda.get_device_name(0)
    if args.smoke:
        report["smoke"] = True
    for model in [m for m in args.models.split(",") if m]:
        layers = SHAPES[model][3]
        if model == "qwen":
            layers = args.qwen_layers
        with tempfile.TemporaryDirectory() as tmp:
            paths = build(
                Path(tmp),
                model,
                layers,
                args.records,
                512 if args.smoke else 8192,
                args.device,
                SMOKE_WORDS if args.smoke else WORDS,
            )
            for method in [m for m in args.methods.split(",") if m]:
                key = model if method == "lora" else f"{model}/{method}"
                rounds: list[dict[str, Any]] = []
                for rnd in range(args.rounds):
                    # each round runs every contender once, the order rotated between rounds
                    # (load on a shared machine drifts); ratios are taken within a round
                    order = (
                        contenders[rnd % len(contenders) :] + contenders[: rnd % len(contenders)]
                    )
                    results: dict[str, Any] = {}
                    for name in order:
                        r = run_contender(name, paths, args, method, bf16)
                        figures(r, paths["shape"], peak, nominal)
                        results[name] = r
                        print(
                            f"{key:14s} {name:6s} {r['tokens_per_second']:8.1f} tok/s "
                            f"({r['target_tokens_per_second']:6.1f} target)  "
                            f"peak RSS {r['peak_rss_bytes'] / 2**20:6.0f} MiB  "
                            f"loss {r['final_loss']:.4f}  {r['gflops_per_second']:6.1f} GFLOP/s",
                            file=sys.stderr,
                            flush=True,
                        )
                    rounds.append(results)
                entry: dict[str, Any] = {"shape": paths["shape"], "method": method}
                if layers != SHAPES[model][7]:
                    entry["note"] = f"{layers} of the real model's {SHAPES[model][7]} layers"
                entry["results"] = {
                    n: {
                        k: (round(v, 4) if isinstance(v, float) else v)
                        for k, v in r.items()
                        if k != "losses"
                    }
                    for n, r in rounds[0].items()
                }
                per_round = [summarise(r) for r in rounds]
                entry["summary"] = {
                    k: round(statistics.median(s[k] for s in per_round), 4) for k in per_round[0]
                }
                if len(rounds) > 1:
                    entry["summary_per_round"] = per_round
                    entry["tokens_per_second_per_round"] = [
                        {n: round(r["tokens_per_second"], 2) for n, r in rr.items()}
                        for rr in rounds
                    ]
                    entry["peak_rss_mib_per_round"] = [
                        {n: round(r["peak_rss_bytes"] / 2**20) for n, r in rr.items()}
                        for rr in rounds
                    ]
                report["models"][key] = entry
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return 0


def nominal_peak_tflops(device: str) -> float | None:
    """Dense bf16 tensor-core peak of the GPU by name (what MFU is usually quoted against)."""
    if device != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(0)
    for key, tflops in (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L4", 121.0)):
        if key in name:
            return tflops
    return None


def summarise(results: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    g = results.get("graft")
    for base in ("trl", "plain"):
        b = results.get(base)
        if g is None or b is None:
            continue
        out[f"graft_vs_{base}_tokens_per_second"] = g["tokens_per_second"] / b["tokens_per_second"]
        out[f"graft_vs_{base}_peak_rss"] = g["peak_rss_bytes"] / b["peak_rss_bytes"]
        out[f"graft_vs_{base}_final_loss_diff"] = (g["final_loss"] - b["final_loss"]) / b[
            "final_loss"
        ]
        if "peak_gpu_bytes" in g:
            out[f"graft_vs_{base}_peak_gpu_memory"] = g["peak_gpu_bytes"] / max(
                b["peak_gpu_bytes"], 1
            )
    return {k: round(v, 4) for k, v in out.items()}


if __name__ == "__main__":
    sys.exit(main())
