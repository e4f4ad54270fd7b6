"""Trainer throughput: the Graft engine against two transformers.Trainer baselines.

Same model (a ~23M-parameter Llama built locally), same ragged-length data (8-160 words per
sample), same LoRA (r16 on q/k/v/o), same effective batch (8) and steps (24), measured in one
invocation; each configuration runs in a fresh process so peak RSS is its own.

  (a) plain:  transformers.Trainer + peft with defaults (fp32, padded batches)
  (b) stock:  the best stock configuration: bf16 where the CPU has it + group_by_length
  graft:      the Graft engine (flattened batches with per-text attention, bf16 autocast,
              foreach AdamW, tokenized once)

    .venv/bin/python bench/trainer_throughput.py [--steps 24] [--json out.json] [--smoke]

Prints tokens/s, peak RSS and final loss for each, then one JSON object with the ratios against
(a) and (b) and the machine's CPU flags. `--smoke` (a 2-layer, 64-wide model, 2 steps; seconds)
is what `make test` runs, so the benchmark cannot rot; its figures mean nothing (its data: 24
texts of 4-40 words, against 256 of 8-160).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine_facts

BATCH = 8
SEED = 1234
LR = 2.0e-4


# (hidden, intermediate, layers, heads, vocab): the measured shape and the smoke shape
SHAPES = {"full": (512, 1376, 6, 8, 4096), "smoke": (64, 128, 2, 4, 512)}
# (texts beyond the steps' batches, fewest words per text, most): measured and smoke data
TEXTS = {"full": (64, 8, 160), "smoke": (8, 4, 40)}


def build(work: Path, steps: int, shape: str = "full") -> dict[str, Path]:
    """Model, tokenizer and data (deterministic)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(SEED)
    syll = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "be", "do", "fa", "gu", "ha", "ji"]
    words = sorted(
        {"".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(3000)}
    )
    extra, low, high = TEXTS[shape]
    texts = []
    for _ in range(steps * BATCH + extra):
        n = rng.randint(low, high)
        texts.append(" ".join(rng.choice(words) for _ in range(n)))
    data = work / "ragged.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=SHAPES[shape][4],
            special_tokens=["<pad>", "<s>", "</s>"],
            show_progress=False,
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    model_dir = work / "model"
    fast.save_pretrained(str(model_dir))
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=SHAPES[shape][0],
        intermediate_size=SHAPES[shape][1],
        num_hidden_layers=SHAPES[shape][2],
        num_attention_heads=SHAPES[shape][3],
        num_key_value_heads=SHAPES[shape][3],
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=fast.pad_token_id,
        eos_token_id=fast.eos_token_id,
        bos_token_id=fast.bos_token_id,
    )
    torch.manual_seed(SEED)
    LlamaForCausalLM(config).save_pretrained(str(model_dir))
    return {"model": model_dir, "data": data}


def cpu_has_bf16() -> bool:
    """The engine's own rule (native bf16, honouring ATEN/oneDNN ISA caps), so the stock
    baseline and the engine pick the same precision."""
    from graft_trainer.methods import cpu_has_native_bf16

    return cpu_has_native_bf16()


def run_trainer(model_dir: Path, data: Path, steps: int, stock: bool) -> dict[str, Any]:
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    ds = datasets.Dataset.from_list(rows).map(
        lambda r: {"input_ids": tok(r["text"])["input_ids"] + [tok.eos_token_id]},
        remove_columns=["text"],
    )
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            task_type="CAUSAL_LM",
        ),
    )
    kwargs: dict[str, Any] = {}
    if stock:
        kwargs["bf16"] = cpu_has_bf16()
        kwargs["train_sampling_strategy"] = "group_by_length"
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=BATCH,
            max_steps=steps,
            learning_rate=LR,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=SEED,
            use_cpu=True,
            lr_scheduler_type="cosine",
            warmup_steps=math.ceil(0.03 * steps),
            dataloader_num_workers=0,
            **kwargs,
        )
        collator = DataCollatorForLanguageModeling(tok, mlm=False)
        counted = {"tokens": 0}

        def collate(features: list[dict[str, Any]]) -> dict[str, Any]:
            counted["tokens"] += sum(len(f["input_ids"]) for f in features)
            return collator(features)

        trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens": counted["tokens"], "seconds": seconds, "losses": losses}


def run_graft(model_dir: Path, data: Path, steps: int) -> dict[str, Any]:
    from graft.api.finetune import FineTuneJobSpec
    from graft_trainer.engine import Engine, JobIdentity
    from graft_trainer.reporting import NullReporter

    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"uri": f"file://{model_dir}"},
            "dataset": {"uri": f"file://{data}", "textTemplate": "{text}", "maxSeqLength": 1024},
            "method": "lora",
            "lora": {
                "r": 16,
                "alpha": 32,
                "dropout": 0.0,
                "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            },
            "training": {
                "maxSteps": steps,
                "learningRate": LR,
                "perDeviceTrainBatchSize": BATCH,
                "loggingSteps": 1,
                "saveSteps": 10**6,
                "seed": SEED,
                "lrScheduler": "cosine",
                "precision": "auto",
            },
        }
    )
    with tempfile.TemporaryDirectory() as out:
        result = Engine(spec, JobIdentity("bench"), f"file://{out}/", NullReporter()).run()
        run = json.loads((Path(out) / "metrics.json").read_text())["run"]
    losses = [h["train_loss"] for h in result.history if "train_loss" in h]
    return {"tokens": run["tokens"], "seconds": run["trainSeconds"], "losses": losses}


def child(name: str, model_dir: Path, data: Path, steps: int) -> None:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    if name == "graft":
        out = run_graft(model_dir, data, steps)
    else:
        out = run_trainer(model_dir, data, steps, stock=name == "stock")
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(out))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--json")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, 2 steps (seconds)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.steps = 2
    if args.child:
        child(args.child, Path(args.model), Path(args.data), args.steps)
        return 0
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = build(Path(tmp), args.steps, "smoke" if args.smoke else "full")
        for name in ("plain", "stock", "graft"):
            proc = subprocess.run(
                [
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
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            r = json.loads(line[-1][7:])
            r["tokens_per_second"] = r["tokens"] / r["seconds"]
            tail = r["losses"][-4:]
            r["final_loss"] = sum(tail) / len(tail)
            results[name] = r
            print(
                f"{name:6s} {r['tokens_per_second']:9.0f} tokens/s  peak RSS {r['peak_rss_bytes'] / 2**20:7.0f} MiB  "
                f"final loss {r['final_loss']:.4f}  ({r['tokens']} tokens in {r['seconds']:.1f} s)",
                flush=True,
            )
    a, b, g = results["plain"], results["stock"], results["graft"]
    summary = {
        "graft_vs_plain_tokens_per_second": g["tokens_per_second"] / a["tokens_per_second"],
        "graft_vs_stock_tokens_per_second": g["tokens_per_second"] / b["tokens_per_second"],
        "stock_vs_plain_tokens_per_second": b["tokens_per_second"] / a["tokens_per_second"],
        "graft_vs_plain_peak_rss": g["peak_rss_bytes"] / a["peak_rss_bytes"],
        "graft_vs_stock_peak_rss": g["peak_rss_bytes"] / b["peak_rss_bytes"],
        "graft_vs_plain_final_loss_diff": (g["final_loss"] - a["final_loss"]) / a["final_loss"],
        "graft_vs_stock_final_loss_diff": (g["final_loss"] - b["final_loss"]) / b["final_loss"],
    }
    for key, value in summary.items():
        print(f"{key:36s} {value:+.3f}" if "diff" in key else f"{key:36s} {value:.2f}x")
    report = {
        "summary": summary,
        "machine": machine_facts(),
        "steps": args.steps,
        "bf16": cpu_has_bf16(),  # stock and graft both, by the same rule
    }
    if args.smoke:
        report["smoke"] = True
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, **report}, indent=2))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
