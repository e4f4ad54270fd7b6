"""`graft generate` on the testkit's tiny Llama: a PEFT adapter through transformers answers
exactly like `model.generate`, a bundle's adapters exactly like onnxruntime-genai used directly,
JSONL in gives JSONL out, from local folders, FineTuneJob outputs and s3://; bad input and
tampered artifacts are refused in one line."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(300)]

pytest.importorskip("onnxruntime_genai")
stages = pytest.importorskip("graft_trainer.export.stages")

from graft.cli import main as graft_main  # noqa: E402
from graft.storage import write_artifact  # noqa: E402
from graft_trainer import generate as G  # noqa: E402
from graft_trainer.export import validate as checks  # noqa: E402
from graft_trainer.export.manifest import model_digest  # noqa: E402

PROMPTS = [
    "<|user|>\nThe movie was great<|end|>\n<|assistant|>\n",
    "The movie",
    "I think",
    "<|user|>\nThe hotel<|end|>\n<|assistant|>\n",
]
TOKENS = 10
GRAFT = Path(sys.executable).with_name("graft")


@dataclass(frozen=True)
class Kit:
    base: Path
    alpha: Path  # PEFT adapter artifacts (manifest.json with baseModel.digest)
    beta: Path
    bundle: Path  # AdapterBundle output: alpha and beta over one fp32 base
    run: Path  # a FineTuneJob-like output folder whose adapter/ is alpha


def lora(base: Path, staging: Path, out: Path, *, seed: int, targets: list[str]) -> Path:
    """A LoRA adapter with random A and B (no training needed for outputs that differ),
    published as an artifact: files, then a manifest naming the base's digest."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=32, target_modules=targets, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(str(staging))
    manifest = {"kind": "adapter", "baseModel": {"uri": str(base), "digest": model_digest(base)}}
    write_artifact(staging, out.as_uri() + "/", manifest)
    return out


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    from graft_trainer.testkit import build_tiny_llama

    root = tmp_path_factory.mktemp("generate")
    base = build_tiny_llama(root / "base", seed=0, pretrain_steps=0)
    alpha = lora(base, root / "s-alpha", root / "alpha", seed=1, targets=["q_proj", "v_proj"])
    beta = lora(
        base,
        root / "s-beta",
        root / "beta",
        seed=2,
        targets=["q_proj", "k_proj", "o_proj", "up_proj"],
    )
    spec = {
        "baseModel": {"uri": base.as_uri()},
        "adapters": [{"name": "alpha", "uri": "file:///a"}, {"name": "beta", "uri": "file:///b"}],
        "target": {"device": "cpu", "precision": "fp32"},
        "validate": {"prompts": PROMPTS[:1], "maxNewTokens": 4},
    }
    result = stages.run_bundle(
        spec,
        base_model_dir=base,
        adapters=[
            stages.BundleAdapterInput("alpha", alpha),
            stages.BundleAdapterInput("beta", beta),
        ],
        out_dir=root / "bundle",
        measure_overhead=False,
    )
    # What a FineTuneJob leaves in its output prefix: adapter/ beside metrics, all under one
    # manifest of kind finetune-output.
    staging = root / "s-run"
    shutil.copytree(alpha, staging / "adapter")
    (staging / "metrics.json").write_text("{}")
    write_artifact(staging, (root / "run").as_uri() + "/", {"kind": "finetune-output"})
    return Kit(base=base, alpha=alpha, beta=beta, bundle=result.out_dir, run=root / "run")


def graft(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = graft_main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------
# (a) PEFT adapter through transformers


def test_peft_adapter_greedy_equals_model_generate(
    kit: Kit, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(kit.base))
    model = AutoModelForCausalLM.from_pretrained(str(kit.base), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(kit.alpha)).eval()
    expected = []
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=TOKENS, do_sample=False)
            expected.append([int(t) for t in out[0][ids["input_ids"].shape[1] :]])

    runner = G.load_runner(G.open_artifact(str(kit.alpha)), device="cpu")
    got = [runner.generate(p, G.Options(max_new_tokens=TOKENS)) for p in PROMPTS]
    assert [c.tokens for c in got] == expected
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in expected]
    assert [c.text for c in got] == texts

    # The CLI streams the same text, one completion per --prompt; the FineTuneJob's output
    # folder stands for its adapter/.
    code, out, err = graft(
        str(kit.run), "--prompt", PROMPTS[0], "--prompt", PROMPTS[2], "--max-new-tokens",
        str(TOKENS), "--device", "cpu", capsys=capsys,
    )  # fmt: skip
    assert code == 0, err
    assert out == f"{texts[0]}\n{texts[2]}\n"
    assert "PEFT adapter" in err and str(kit.base) in err


def test_peft_adapter_on_another_base_is_refused(
    kit: Kit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other-base"
    shutil.copytree(kit.base, other)
    (other / "README.md").write_text("not the same files\n")
    code, _, err = graft(str(kit.alpha), "--base", str(other), "--prompt", "x", capsys=capsys)
    assert code == 2
    assert "was trained on base model" in err and "not the same model" in err
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# (b) AdapterBundle through onnxruntime-genai


def test_bundle_adapters_answer_like_onnxruntime_genai_directly(
    kit: Kit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = kit.bundle / "model"
    files = {n: kit.bundle / "adapters" / f"{n}.onnx_adapter" for n in ("alpha", "beta")}
    direct = checks.GenaiModel(model_dir, files)
    plain = checks.GenaiModel(model_dir, filename=stages.BASE_GRAPH)
    expected = {
        name: [direct.generate(p, TOKENS, adapter=name).tokens for p in PROMPTS]
        for name in ("alpha", "beta")
    }
    expected["none"] = [plain.generate(p, TOKENS).tokens for p in PROMPTS]
    # The fixture's adapters change the answers, each its own way.
    assert expected["alpha"] != expected["beta"] != expected["none"] != expected["alpha"]

    artifact = G.open_artifact(str(kit.bundle))
    assert artifact.kind == G.BUNDLE and set(artifact.adapters) == {"alpha", "beta"}
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    for name in ("alpha", "beta", "none"):
        runner = G.load_runner(artifact, adapter=None if name == "none" else name)
        got = [runner.generate(p, G.Options(max_new_tokens=TOKENS)) for p in PROMPTS]
        assert [c.tokens for c in got] == expected[name], name
        # The CLI's JSONL carries the same completions.
        flags = [] if name == "none" else ["--adapter", name]
        code, out, err = graft(
            str(kit.bundle), "--prompts", str(prompts), "--max-new-tokens", str(TOKENS), *flags,
            capsys=capsys,
        )  # fmt: skip
        assert code == 0, err
        lines = [json.loads(line) for line in out.splitlines()]
        assert [r["completion"] for r in lines] == [c.text for c in got]
        assert (f"adapter {name!r}" if name != "none" else "no adapter") in err


def test_exported_model_serves_its_separate_adapter_by_default(
    kit: Kit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = {
        "source": {"model": {"uri": "file:///base"}, "adapter": {"uri": "file:///a"}},
        "adapterMode": "separate",
        "target": {"device": "cpu", "precision": "fp32"},
        "validate": {"prompts": PROMPTS[:1], "maxNewTokens": 4},
    }
    out = stages.run_optimize(
        spec, model_dir=kit.base, adapter_dir=kit.alpha, out_dir=tmp_path / "export"
    ).out_dir
    direct = checks.GenaiModel(out, {"default": out / stages.ADAPTER_FILE})
    plain = checks.GenaiModel(out, filename=stages.BASE_GRAPH)
    artifact = G.open_artifact(str(out))
    assert artifact.kind == G.ONNX and artifact.default_adapter == "default"
    tuned = G.load_runner(artifact)
    base = G.load_runner(artifact, no_adapter=True)
    options = G.Options(max_new_tokens=TOKENS)
    for prompt in PROMPTS:
        assert tuned.generate(prompt, options).tokens == (
            direct.generate(prompt, TOKENS, adapter="default").tokens
        )
        assert base.generate(prompt, options).tokens == plain.generate(prompt, TOKENS).tokens
    code, text, err = graft(
        str(out), "--prompt", PROMPTS[1], "--max-new-tokens", str(TOKENS), capsys=capsys
    )
    assert code == 0 and "adapter 'default'" in err
    assert text == tuned.generate(PROMPTS[1], options).text + "\n"


def test_bundle_from_s3(
    kit: Kit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for key, value in {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "GRAFT_CACHE_DIR": str(tmp_path / "cache"),
        }.items():
            monkeypatch.setenv(key, value)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket="models"
        )
        manifest = json.loads((kit.bundle / "manifest.json").read_text())
        staging = tmp_path / "up"
        shutil.copytree(kit.bundle, staging, ignore=shutil.ignore_patterns("manifest.json"))
        body = {k: v for k, v in manifest.items() if k != "files"}
        write_artifact(staging, "s3://models/team/bundle/", body)
        local = G.load_runner(G.open_artifact(str(kit.bundle)), adapter="beta")
        expected = local.generate(PROMPTS[0], G.Options(max_new_tokens=TOKENS)).text
        code, out, err = graft(
            "s3://models/team/bundle", "--adapter", "beta", "--prompt", PROMPTS[0],
            "--max-new-tokens", str(TOKENS), capsys=capsys,
        )  # fmt: skip
        assert code == 0, err
        assert out == expected + "\n"
    finally:
        server.stop()


def test_peft_adapter_and_its_base_from_the_hub(kit: Kit, tmp_path: Path) -> None:
    """hf://acme/tone-lora, whose config names its base by Hub id (as FineTuneJob adapters
    trained on hf:// models do), fetched through a local server speaking the Hub's protocol."""
    from tests.hub_server import HubServer

    files = {
        p.name: p.read_bytes()
        for p in kit.alpha.iterdir()
        if p.name not in ("manifest.json", "adapter_config.json")
    }
    config = json.loads((kit.alpha / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "acme/tiny-base"
    files["adapter_config.json"] = json.dumps(config).encode()
    expected = G.load_runner(G.open_artifact(str(kit.alpha)), device="cpu").generate(
        PROMPTS[0], G.Options(max_new_tokens=TOKENS)
    )
    with HubServer() as hub:
        hub.publish("acme/tiny-base", kit.base)
        hub.publish("acme/tone-lora", files)
        env = {
            **os.environ,
            "HF_ENDPOINT": hub.url,
            "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
        argv = [str(GRAFT), "generate", "hf://acme/tone-lora", "--prompt", PROMPTS[0]]
        argv += ["--max-new-tokens", str(TOKENS), "--device", "cpu"]
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == expected.text + "\n"
    assert "on hf://acme/tiny-base" in done.stderr


# ---------------------------------------------------------------------------------------------
# (c) JSONL in, JSONL out, through the installed command


def test_jsonl_in_jsonl_out_through_the_real_command(kit: Kit, tmp_path: Path) -> None:
    rows = [{"text": p, "id": i} for i, p in enumerate(PROMPTS)]
    prompts = write_jsonl(tmp_path / "in.jsonl", [rows[0], "", *rows[1:]])  # a blank line
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    base = [str(GRAFT), "generate", str(kit.bundle), "--adapter", "alpha", "--field", "text"]
    base += ["--prompts", str(prompts), "--max-new-tokens", str(TOKENS)]
    done = subprocess.run(base, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["prompt"] for r in lines] == PROMPTS
    assert [r["id"] for r in lines] == [0, 1, 2, 3]
    assert all(isinstance(r["completion"], str) for r in lines)

    out = tmp_path / "out.jsonl"
    done = subprocess.run([*base, "--output", str(out)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == lines
    # The completions streamed to stdout meanwhile, one line each.
    assert done.stdout == "".join(r["completion"] + "\n" for r in lines)
    assert f"4 completions in {out}" in done.stderr


# ---------------------------------------------------------------------------------------------
# (d) refusals: one line, exit code 2 (3 for a tampered artifact)


def one_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_unknown_adapter_lists_the_bundles(kit: Kit, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = graft(str(kit.bundle), "--adapter", "gamma", "--prompt", "x", capsys=capsys)
    assert code == 2 and out == ""
    assert "no adapter 'gamma'" in one_error(err) and "its adapters: alpha, beta" in err
    code, _, err = graft(str(kit.alpha), "--adapter", "alpha", "--prompt", "x", capsys=capsys)
    assert code == 2 and "picks an adapter of an AdapterBundle" in one_error(err)


def test_bad_jsonl_line_is_named(
    kit: Kit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"prompt": 3}])
    code, out, err = graft(str(kit.bundle), "--prompts", str(bad), capsys=capsys)
    assert code == 2 and out == ""
    assert f"{bad}:2: expected a string field 'prompt'" in one_error(err)
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"prompt": "ok"}, "", "{nope"])
    code, _, err = graft(str(kit.bundle), "--prompts", str(broken), capsys=capsys)
    assert code == 2 and f"{broken}:3: not JSON" in one_error(err)


def test_a_folder_that_is_no_artifact(
    kit: Kit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    code, _, err = graft(str(tmp_path), "--prompt", "x", capsys=capsys)
    assert code == 2
    line = one_error(err)
    assert "is not a model Graft can run" in line and "genai_config.json" in line
    assert "notes.txt" in line
    code, _, err = graft(str(tmp_path / "missing"), "--prompt", "x", capsys=capsys)
    assert code == 2 and "no such folder" in one_error(err)


def test_tampered_artifacts_are_refused(
    kit: Kit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = tmp_path / "alpha"
    shutil.copytree(kit.alpha, adapter)
    weights = adapter / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, out, err = graft(str(adapter), "--prompt", "x", capsys=capsys)
    assert code == 3 and out == ""
    line = one_error(err)
    assert "adapter_model.safetensors does not match its manifest" in line

    bundle = tmp_path / "bundle"
    shutil.copytree(kit.bundle, bundle)
    with (bundle / "adapters" / "beta.onnx_adapter").open("ab") as fh:
        fh.write(b"\0")
    code, _, err = graft(str(bundle), "--adapter", "beta", "--prompt", "x", capsys=capsys)
    assert code == 3 and "beta.onnx_adapter does not match its manifest" in one_error(err)
