"""`graft generate`'s cheap parts: prompts from JSONL, what a folder holds, which adapter is
picked, the options and the command line. No model is loaded."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from graft.storage import IntegrityError, write_artifact
from graft_trainer import generate as G
from graft_trainer.cli import register
from graft_trainer.errors import GraftInputError


def parse(*lines: str, field: str = "prompt") -> list[G.PromptItem]:
    return G.parse_prompt_lines(lines, "in.jsonl", field)


# ---------------------------------------------------------------------------------------------
# Prompts


def test_prompts_keep_their_other_fields_and_skip_blank_lines() -> None:
    items = parse('{"prompt": "a", "id": 7}', "", "   ", '{"prompt": "b"}')
    assert [i.prompt for i in items] == ["a", "b"]
    assert [i.where for i in items] == ["in.jsonl:1", "in.jsonl:4"]
    assert G.output_record(items[0], "x") == {"id": 7, "prompt": "a", "completion": "x"}


def test_another_field_names_the_prompt() -> None:
    (item,) = parse('{"text": "hi", "label": "pos"}', field="text")
    assert item.prompt == "hi"
    assert G.output_record(item, "yo") == {"label": "pos", "prompt": "hi", "completion": "yo"}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{nope", r"in.jsonl:2: not JSON \(.*column 2\); expected one object per line"),
        ("[1, 2]", r"in.jsonl:2: a JSON list, expected an object with a string field 'prompt'"),
        ('"text"', r"in.jsonl:2: a JSON str, expected an object"),
        (
            '{"text": "x", "id": 1}',
            r"in.jsonl:2: expected a string field 'prompt' \(got no such field; the line has "
            r"fields: id, text\); --field names another",
        ),
        ('{"prompt": 3}', r"in.jsonl:2: expected a string field 'prompt' \(got a int;"),
        ('{"prompt": null}', r"got a NoneType"),
    ],
)
def test_a_bad_line_is_named_with_what_was_expected(line: str, message: str) -> None:
    with pytest.raises(GraftInputError, match=message):
        parse('{"prompt": "fine"}', line)


def test_no_prompts_at_all() -> None:
    with pytest.raises(GraftInputError, match=r"in.jsonl: no prompts"):
        parse("", " ")


def test_prompts_file_that_cannot_be_read(tmp_path: Path) -> None:
    with pytest.raises(GraftInputError, match="cannot read prompts from"):
        G.read_prompts_file(str(tmp_path / "missing.jsonl"))
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n')
    assert [i.prompt for i in G.read_prompts_file(str(path))] == ["a"]


# ---------------------------------------------------------------------------------------------
# What a folder holds


def bundle_folder(root: Path, with_manifest: bool = True) -> Path:
    (root / "model").mkdir(parents=True)
    (root / "model" / "genai_config.json").write_text("{}")
    (root / "model" / "base.onnx").write_bytes(b"graph")
    (root / "adapters").mkdir()
    for name in ("tone", "verdict"):
        (root / "adapters" / f"{name}.onnx_adapter").write_bytes(name.encode())
    if with_manifest:
        body = {
            "kind": "adapter-bundle",
            "model": "model/",
            "noAdapter": {"model": "model/", "filename": "base.onnx"},
            "adapters": [
                {"name": "tone", "file": "adapters/tone.onnx_adapter"},
                {"name": "verdict", "file": "adapters/verdict.onnx_adapter"},
            ],
        }
        (root / "manifest.json").write_text(json.dumps(body))
    return root


def test_a_bundle_by_its_manifest_and_by_its_layout(tmp_path: Path) -> None:
    for folder in (bundle_folder(tmp_path / "m"), bundle_folder(tmp_path / "n", False)):
        artifact = G.detect(folder)
        assert artifact.kind == G.BUNDLE
        assert artifact.adapters == {
            "tone": folder / "adapters" / "tone.onnx_adapter",
            "verdict": folder / "adapters" / "verdict.onnx_adapter",
        }
        assert artifact.model_dir == folder / "model"
        assert artifact.plain == (folder / "model", "base.onnx")
        assert artifact.default_adapter is None


def test_a_manifest_cannot_point_outside_its_folder(tmp_path: Path) -> None:
    folder = bundle_folder(tmp_path / "b")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["adapters"][0]["file"] = "../../etc/passwd"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="not a plain relative path"):
        G.detect(folder)


def test_an_export_with_a_separate_adapter_activates_it_by_default(tmp_path: Path) -> None:
    (tmp_path / "genai_config.json").write_text("{}")
    (tmp_path / "base.onnx").write_bytes(b"")
    body = {
        "kind": "onnx-model",
        "adapter": {"file": "adapter.onnx_adapter", "activateAs": "default"},
    }
    (tmp_path / "manifest.json").write_text(json.dumps(body))
    artifact = G.detect(tmp_path)
    assert artifact.kind == G.ONNX and artifact.default_adapter == "default"
    assert artifact.adapters == {"default": tmp_path / "adapter.onnx_adapter"}
    assert G.pick_adapter(artifact, None, no_adapter=False) == "default"
    assert G.pick_adapter(artifact, None, no_adapter=True) is None


def test_peft_adapter_and_model_folders(tmp_path: Path) -> None:
    peft = tmp_path / "adapter"
    peft.mkdir()
    (peft / "adapter_config.json").write_text("{}")
    assert G.detect(peft).kind == G.PEFT
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(GraftInputError, match="without safetensors weights"):
        G.detect(model)
    (model / "model.safetensors").write_bytes(b"")
    assert G.detect(model).kind == G.MODEL


def test_a_folder_that_is_none_of_them(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "sub").mkdir()
    with pytest.raises(GraftInputError) as info:
        G.detect(tmp_path)
    message = str(info.value)
    assert "is not a model Graft can run" in message
    assert "adapter_config.json" in message and "found data.csv, sub/" in message


def test_a_finetune_output_stands_for_its_adapter(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    (staging / "adapter").mkdir(parents=True)
    (staging / "adapter" / "adapter_config.json").write_text("{}")
    (staging / "adapter" / "adapter_model.safetensors").write_bytes(b"w")
    (staging / "metrics.json").write_text("{}")
    write_artifact(staging, (tmp_path / "run").as_uri() + "/", {"kind": "finetune-output"})
    artifact = G.open_artifact(str(tmp_path / "run"))
    assert artifact.kind == G.PEFT and artifact.path == tmp_path / "run" / "adapter"
    assert artifact.uri.endswith("/run/adapter/")


def test_open_artifact_refuses_files_missing_folders_and_odd_uris(tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(GraftInputError, match="is a file"):
        G.open_artifact(str(tmp_path / "f.txt"))
    with pytest.raises(GraftInputError, match="no such folder"):
        G.open_artifact(str(tmp_path / "nope"))
    with pytest.raises(GraftInputError, match="ftp://x/y"):
        G.open_artifact("ftp://x/y")


def test_paths_become_file_uris(tmp_path: Path) -> None:
    assert G.as_uri(str(tmp_path)) == tmp_path.as_uri() + "/"
    assert G.as_uri("s3://b/p/") == "s3://b/p/"


# ---------------------------------------------------------------------------------------------
# Picking an adapter, options, the base of a PEFT adapter


def test_unknown_adapter_names_those_there_are(tmp_path: Path) -> None:
    artifact = G.detect(bundle_folder(tmp_path / "b"))
    assert G.pick_adapter(artifact, "tone", no_adapter=False) == "tone"
    assert G.pick_adapter(artifact, None, no_adapter=False) is None
    with pytest.raises(GraftInputError, match=r"no adapter 'mood' in .*adapters: tone, verdict"):
        G.pick_adapter(artifact, "mood", no_adapter=False)
    with pytest.raises(GraftInputError, match="exclude each other"):
        G.pick_adapter(artifact, "tone", no_adapter=True)
    peft = tmp_path / "p"
    peft.mkdir()
    (peft / "adapter_config.json").write_text("{}")
    with pytest.raises(GraftInputError, match=r"a PEFT adapter .* has none to pick"):
        G.pick_adapter(G.detect(peft), "tone", no_adapter=False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (G.Options(max_new_tokens=0), "--max-new-tokens must be at least 1"),
        (G.Options(temperature=-1), "--temperature must be 0"),
        (G.Options(top_p=0), "--top-p must be in"),
        (G.Options(top_k=0), "--top-k must be at least 1"),
    ],
)
def test_bad_options(options: G.Options, message: str) -> None:
    with pytest.raises(GraftInputError, match=message):
        G.check_options(options)


def adapter_with_base(tmp_path: Path, config: dict[str, object]) -> G.Artifact:
    folder = tmp_path / "adapter"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return G.detect(folder)


def test_where_a_peft_adapters_base_is(tmp_path: Path) -> None:
    cases = {
        "s3://models/base/": ("s3://models/base/", None),
        str(tmp_path): (str(tmp_path), None),
        "org/model": ("hf://org/model", None),
    }
    for name, expected in cases.items():
        assert (
            G._base_location(adapter_with_base(tmp_path, {"base_model_name_or_path": name}))
            == expected
        )
    pinned = {"base_model_name_or_path": "org/model", "revision": "a" * 40}
    assert G._base_location(adapter_with_base(tmp_path, pinned)) == ("hf://org/model", "a" * 40)
    for config in ({}, {"base_model_name_or_path": "/gone/away/base"}):
        with pytest.raises(GraftInputError, match="--base URI"):
            G._base_location(adapter_with_base(tmp_path, config))


def test_a_pickled_adapter_is_refused(tmp_path: Path) -> None:
    artifact = adapter_with_base(tmp_path, {})
    (artifact.path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(GraftInputError, match="only from safetensors"):
        G.check_peft_adapter(artifact)


# ---------------------------------------------------------------------------------------------
# The command line


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="graft")
    register(top.add_subparsers(dest="command"))
    return top


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    args = parser().parse_args(["generate", *argv])
    code = G.run_command(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_defaults_are_greedy() -> None:
    args = parser().parse_args(["generate", "x", "--prompt", "hi"])
    assert args.temperature == 0.0 and args.max_new_tokens == 128 and args.prompt == ["hi"]
    assert G.Options(temperature=args.temperature).sample is False


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["x"], "give --prompt TEXT"),
        (["x", "--prompt", "a", "--prompts", "f.jsonl"], "give --prompt TEXT"),
        (["x", "--prompt", "a", "--output", "o.jsonl"], "--output writes JSONL for --prompts"),
        (["x", "--prompt", "a", "--temperature", "-0.5"], "--temperature must be 0"),
    ],
)
def test_usage_errors_are_one_line_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_bad_prompts_are_refused_before_the_artifact_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": ["b"]}\n')
    code, _, err = run([str(tmp_path / "no-such-model"), "--prompts", str(bad)], capsys)
    assert code == 2 and f"{bad}:2: expected a string field 'prompt' (got a list" in err
