"""Outputs of a run: adapter or model, metrics.json, training log, TensorBoard events, the
curve PNG, a self-contained report.html, and manifest.json, which is written last."""

from __future__ import annotations

import base64
import html
import io
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import yaml

from graft.api.finetune import FineTuneJobSpec, FineTuneMetrics, TrainingWarning
from graft.progress import Stage
from graft.storage import Store, write_artifact
from graft.storage.uri import join_uri
from graft_trainer.allocator import allocator_in_use
from graft_trainer.data import TrainData, digest_files
from graft_trainer.model_card import render_model_card
from graft_trainer.preflight import Prepared
from graft_trainer.publish import Published, push_folder
from graft_trainer.runtime import environment_summary, peak_rss_bytes
from graft_trainer.tensorboard import write_tensorboard


class RunView(Protocol):
    """What the writer reads of the run (graft_trainer.engine.Engine), and where it records
    the artifacts it wrote."""

    spec: FineTuneJobSpec
    identity: Any  # engine.JobIdentity: name, namespace, uid
    prefix: str
    store: Store
    work_dir: Path
    metrics: FineTuneMetrics
    warnings: list[TrainingWarning]
    history: list[dict[str, Any]]
    artifacts: dict[str, str]
    started: datetime
    processes: int

    def emit(self, stage: Stage, message: str = "") -> None: ...


def curves_png(history: list[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["train_loss"]) for h in history if "train_loss" in h]
    evals = [(h["step"], h["eval/eval_loss"]) for h in history if "eval/eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", marker=".")
    if evals:
        ax.plot(*zip(*evals, strict=True), label="eval loss", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else html.escape(str(value))


def render_report(ctx: dict[str, Any], png: bytes) -> str:
    """A self-contained HTML page: config, data, curves, before/after metrics, samples."""
    rows = []
    for name in sorted(set(ctx["baseline"]) | set(ctx["final"])):
        before, after = ctx["baseline"].get(name), ctx["final"].get(name)
        delta = after - before if isinstance(before, float) and isinstance(after, float) else None
        rows.append(
            f"<tr><td>{name}</td><td>{_fmt(before)}</td><td>{_fmt(after)}</td><td>{_fmt(delta)}</td></tr>"
        )
    samples = "".join(
        f"<tr><td><pre>{html.escape(s['prompt'])}</pre></td><td>{html.escape(s['reference'])}</td>"
        f"<td>{html.escape(s.get('before', ''))}</td><td>{html.escape(s['generated'])}</td></tr>"
        for s in ctx["samples"]
    )
    warnings = (
        "".join(
            f"<li><b>{html.escape(w['type'])}</b>"
            f"{' (since step ' + str(w['sinceStep']) + ')' if w.get('sinceStep') is not None else ''}: "
            f"{html.escape(w['message'])}</li>"
            for w in ctx["warnings"]
        )
        or "<li>none</li>"
    )
    data = ctx["data"]
    mix = "".join(
        f"<tr><td>{html.escape(split)}</td><td>{html.escape(json.dumps(c))}</td></tr>"
        for split, c in data.get("labelCounts", {}).items()
    )
    run = ctx["run"]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Graft report: {html.escape(ctx["name"])}</title>
<style>body{{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}}
pre{{background:#f6f6f6;padding:.6em;overflow:auto;margin:0}}</style></head><body>
<h1>FineTuneJob {html.escape(ctx["name"])}</h1>
<p>method <b>{html.escape(ctx["method"])}</b>, {run["finalStep"]} of {run["totalSteps"]} steps,
best step {run["bestStep"]}{", resumed from step " + str(run["resumedFrom"]) if run["resumedFrom"] else ""}
{", stopped early" if run["stoppedEarly"] else ""}; {run["trainSeconds"]:.1f} s training,
{run["tokensPerSecond"]:.0f} tokens/s, peak memory {run["peakMemoryBytes"] / 2**20:.0f} MiB.</p>
<h2>Metrics before and after</h2>
<table><tr><th>metric</th><th>baseline</th><th>after</th><th>change</th></tr>{"".join(rows)}</table>
<h2>Warnings</h2><ul>{warnings}</ul>
<h2>Curves</h2><img alt="loss curves" src="data:image/png;base64,{base64.b64encode(png).decode()}">
<h2>Data</h2><p>{data["trainRecords"]} train records, {data["evalRecords"]} eval records,
{data["truncated"]} truncated, packing {data["packing"]}; digest {html.escape(data["digest"])}.</p>
<table>{mix}</table>
<h2>Sample generations</h2>
<table><tr><th>prompt</th><th>reference</th><th>before</th><th>after</th></tr>{samples}</table>
<h2>Configuration</h2><pre>{html.escape(yaml.safe_dump(ctx["spec"], sort_keys=False))}</pre>
</body></html>
"""


def name_base_model(config_path: Path, model: Any, commit: str | None) -> None:
    """Point a saved adapter's config at its base by name, not by the pod's cache path: the
    Hub id and commit for hf:// (so `AutoPeftModelForCausalLM.from_pretrained` finds it where
    the Hub is reachable), the URI otherwise. target_modules are sorted."""
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        # PEFT keeps them as a set, written in the process's hash order: sorted, the same
        # adapter has the same bytes (and a rerun finds its files already on the Hub).
        config["target_modules"] = sorted(config["target_modules"])
    uri = str(model.uri)
    if uri.startswith("hf://"):
        config["base_model_name_or_path"] = uri.removeprefix("hf://")
        config["revision"] = commit or model.revision
    else:
        config["base_model_name_or_path"] = uri
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


class OutputWriter:
    def __init__(self, engine: RunView, prep: Prepared, data: TrainData) -> None:
        self.engine = engine
        self.prep = prep
        self.data = data
        self.out_dir = engine.work_dir / "output"

    def publish(self, weights: Path, kind: str, best_step: int | None) -> Published:
        """Push the finished weights folder to spec.publish (nothing when the branch already
        holds the same files)."""
        eng, location = self.engine, self.engine.spec.publish
        assert location is not None
        where = f"{location.uri}@{location.revision or 'main'}"
        eng.emit("exporting", f"pushing the {kind} to {where}")
        job = f"{eng.identity.namespace}/{eng.identity.name}"
        published = push_folder(
            weights,
            location,
            message=f"Graft FineTuneJob {job}: {kind} of step {best_step}",
        )
        eng.emit(
            "exporting",
            f"{'pushed' if published.pushed else 'already on the Hub, not pushed again'}: "
            f"{published.uri}",
        )
        return published

    def write(
        self,
        *,
        model: Any,
        tokenizer: Any,
        final_step: int,
        total_steps: int,
        best_step: int | None,
        resumed_from: int | None,
        stopped_early: bool,
        baseline: dict[str, float],
        final: dict[str, float],
        samples: list[dict[str, str]],
        baseline_samples: list[dict[str, str]],
        train_seconds: float,
        tokens_total: int,
    ) -> None:
        """Weights, reports and manifests in the store (spec.publish's push between the
        weights' manifest and the run's), and their URIs in the engine's artifacts."""
        eng = self.engine
        out = self.out_dir
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        kind, weights = self.save_weights(model, tokenizer)
        base_digest = "sha256:" + digest_files(
            [p for p in self.prep.model_dir.iterdir() if p.is_file()]
        )
        finished = datetime.now(UTC)
        before = {s["prompt"]: s["generated"] for s in baseline_samples}
        for s in samples:
            s["before"] = before.get(s["prompt"], "")
        run = {
            "finalStep": final_step,
            "totalSteps": total_steps,
            "bestStep": best_step,
            "resumedFrom": resumed_from,
            "stoppedEarly": stopped_early,
            "trainSeconds": train_seconds,
            "tokens": tokens_total,
            "tokensPerSecond": tokens_total / train_seconds if train_seconds else 0.0,
            "peakMemoryBytes": eng.metrics.peak_memory_bytes or peak_rss_bytes(),
            "processes": eng.processes,
            "allocator": allocator_in_use(),
        }
        metrics = {
            "baseline": baseline,
            "final": final,
            "run": run,
            "memoryEstimate": self.prep.memory,
            "warnings": [w.to_api() for w in eng.warnings],
            "history": eng.history,
        }
        self.write_reports(weights, metrics, samples)
        common = self.common_manifest(base_digest, finished, train_seconds)
        self.store_outputs(kind, weights, common, metrics, best_step)

    def save_weights(self, model: Any, tokenizer: Any) -> tuple[str, Path]:
        """The adapter (or the full model) with its tokenizer: (kind, folder)."""
        spec = self.engine.spec
        kind = "model" if spec.method == "full" else "adapter"
        weights = self.out_dir / kind
        model.save_pretrained(str(weights))
        tokenizer.save_pretrained(str(weights))
        if kind == "adapter":
            name_base_model(weights / "adapter_config.json", spec.model, self.prep.model_commit)
        return kind, weights

    def data_summary(self) -> dict[str, Any]:
        spec = self.engine.spec
        return {
            "uri": spec.dataset.uri,
            "digest": self.prep.dataset_digest,
            "trainRecords": self.data.train_records,
            "evalRecords": self.data.eval_records,
            "truncated": self.data.truncated,
            "packing": spec.dataset.packing,
            "packedRows": len(self.data.packed_rows) if self.data.packed_rows else None,
            "labelCounts": self.data.label_counts,
        }

    def write_reports(
        self, weights: Path, metrics: dict[str, Any], samples: list[dict[str, str]]
    ) -> None:
        """metrics.json, the model card, train_log.jsonl, TensorBoard events, curves.png and
        report.html in the output folder."""
        eng, spec, out = self.engine, self.engine.spec, self.out_dir
        baseline, final, run = metrics["baseline"], metrics["final"], metrics["run"]
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
        # Over PEFT's placeholder: the card the Hub renders beside the weights.
        (weights / "README.md").write_text(
            render_model_card(
                name=eng.identity.name,
                namespace=eng.identity.namespace,
                spec=spec.to_api(),
                model_commit=self.prep.model_commit,
                dataset_digest=self.prep.dataset_digest,
                baseline=baseline,
                final=final,
                run=run,
            )
        )
        (out / "train_log.jsonl").write_text(
            "".join(json.dumps(h, default=float) + "\n" for h in eng.history)
        )
        write_tensorboard(out / "tensorboard", eng.history)
        png = curves_png(eng.history)
        (out / "curves.png").write_bytes(png)
        ctx = {
            "name": eng.identity.name,
            "method": spec.method,
            "spec": spec.to_api(),
            "baseline": baseline,
            "final": final,
            "samples": samples,
            "run": run,
            "data": self.data_summary(),
            "warnings": metrics["warnings"],
        }
        (out / "report.html").write_text(render_report(ctx, png))

    def common_manifest(
        self, base_digest: str, finished: datetime, train_seconds: float
    ) -> dict[str, Any]:
        """What the manifests of the weights and of the whole output share."""
        eng, spec = self.engine, self.engine.spec
        return {
            "job": {
                "name": eng.identity.name,
                "namespace": eng.identity.namespace,
                "uid": eng.identity.uid,
            },
            "spec": spec.to_api(),
            "baseModel": {
                "uri": spec.model.uri,
                "revision": spec.model.revision,
                "commit": self.prep.model_commit,
                "digest": base_digest,
            },
            "dataset": {"uri": spec.dataset.uri, "digest": self.prep.dataset_digest},
            "libraries": environment_summary(),
            "timings": {
                "started": eng.started.isoformat(),
                "finished": finished.isoformat(),
                "seconds": (finished - eng.started).total_seconds(),
                "trainSeconds": train_seconds,
            },
        }

    def store_outputs(
        self,
        kind: str,
        weights: Path,
        common: dict[str, Any],
        metrics: dict[str, Any],
        best_step: int | None,
    ) -> None:
        """The weights (manifest last), spec.publish's push, then the whole output folder
        with its manifest last."""
        eng, out = self.engine, self.out_dir
        weights_uri = join_uri(eng.prefix, f"{kind}/")
        write_artifact(
            weights, weights_uri, {**common, "kind": kind, "bestStep": best_step}, store=eng.store
        )
        eng.artifacts[kind] = weights_uri
        extra: dict[str, Any] = {}
        if eng.spec.publish is not None:
            # The weights' manifest is complete (in the store and in the folder): push the
            # folder as it is, then record the commit beside the other artifacts.
            published = self.publish(weights, kind, best_step)
            eng.artifacts["published"] = published.uri
            extra["published"] = published.record()
            metrics["published"] = published.record()
            (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
        write_artifact(
            out,
            eng.prefix,
            {
                **common,
                "kind": "finetune-output",
                "run": metrics["run"],
                "metrics": metrics["final"],
                **extra,
            },
            store=eng.store,
        )
        eng.artifacts.update(
            {
                "report": join_uri(eng.prefix, "report.html"),
                "metrics": join_uri(eng.prefix, "metrics.json"),
                "tensorboard": join_uri(eng.prefix, "tensorboard/"),
            }
        )
