"""`graft generate`: run prompts through what Graft produced, streaming the tokens.

What can be run, found by what the folder holds (`open_artifact`):

- an AdapterBundle (manifest kind ``adapter-bundle``, or ``model/genai_config.json`` beside
  ``adapters/*.onnx_adapter``): onnxruntime-genai, one adapter chosen with ``--adapter NAME``;
  without one the plain base graph (``base.onnx``, the bundle's ``noAdapter`` entry) answers;
- an ONNX Runtime GenAI model (``genai_config.json``: an OptimizeJob's export); with
  ``adapterMode: separate`` its adapter is active unless ``--no-adapter``;
- a PEFT adapter (``adapter_config.json``: a FineTuneJob's ``adapter/``): transformers + peft
  on the base its config names (a URI, a Hub id, a local path) or ``--base URI``;
- a Hugging Face model (``config.json`` and safetensors weights: a full fine-tune's ``model/``).

A FineTuneJob's output folder (manifest kind ``finetune-output``) stands for its ``adapter/``
or ``model/``. Locations are local paths, file://, pvc://, s3:// or hf:// URIs, fetched through
`graft_trainer.sources.fetch_model`: a folder with a manifest is read only when every file
matches its digest (IntegrityError, exit code 3). Nothing read executes code: no
trust_remote_code, weights from safetensors only.

Errors are `GraftInputError` (one line, exit code 2) naming the location and what was expected.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from graft_trainer.errors import GraftInputError

OnText = Callable[[str], None]

BUNDLE, ONNX, PEFT, MODEL = "adapter-bundle", "onnx-model", "peft-adapter", "hf-model"
KIND_WORDS = {
    BUNDLE: "an AdapterBundle",
    ONNX: "an ONNX Runtime GenAI model",
    PEFT: "a PEFT adapter",
    MODEL: "a Hugging Face model",
}
EXPECTED = (
    "expected an AdapterBundle (manifest.json of kind adapter-bundle), an ONNX Runtime GenAI "
    "model (genai_config.json), a PEFT adapter (adapter_config.json) or a Hugging Face model "
    "(config.json with safetensors weights)"
)
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


# ---------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class PromptItem:
    """One prompt, with the rest of its JSONL object (carried into the output line)."""

    prompt: str
    extra: dict[str, Any] = field(default_factory=dict)
    where: str = ""  # file:line


def parse_prompt_lines(
    lines: Iterable[str], source: str, field: str = "prompt"
) -> list[PromptItem]:
    """The prompts of a JSONL text: one object per line with a string `field`; blank lines are
    skipped. A bad line is a GraftInputError naming `source:line` and what was expected."""
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise GraftInputError(
                f"{where}: not JSON ({exc.msg} at column {exc.colno}); expected one object per "
                f'line such as {{"{field}": "..."}}'
            ) from None
        if not isinstance(obj, dict):
            raise GraftInputError(
                f"{where}: a JSON {type(obj).__name__}, expected an object with a string field "
                f"{field!r}"
            )
        value = obj.get(field)
        if not isinstance(value, str):
            got = "no such field" if field not in obj else f"a {type(value).__name__}"
            keys = ", ".join(sorted(obj)[:6]) or "none"
            raise GraftInputError(
                f"{where}: expected a string field {field!r} (got {got}; the line has fields: "
                f"{keys}); --field names another"
            )
        extra = {k: v for k, v in obj.items() if k != field}
        items.append(PromptItem(prompt=value, extra=extra, where=where))
    if not items:
        raise GraftInputError(f"{source}: no prompts (expected one JSON object per line)")
    return items


def read_prompts_file(path: str, field: str = "prompt") -> list[PromptItem]:
    """`parse_prompt_lines` of a file, or of standard input for ``-``."""
    if path == "-":
        return parse_prompt_lines(sys.stdin.read().splitlines(), "<stdin>", field)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GraftInputError(f"cannot read prompts from {path}: {exc}") from None
    return parse_prompt_lines(text.splitlines(), path, field)


def output_record(item: PromptItem, completion: str) -> dict[str, Any]:
    return {**item.extra, "prompt": item.prompt, "completion": completion}


# ---------------------------------------------------------------------------------------------
# Artifacts


@dataclass
class Artifact:
    """A runnable artifact in a local folder (downloaded and verified when it was remote)."""

    kind: str
    path: Path
    uri: str
    manifest: dict[str, Any] | None = None
    # Bundle or separate export: adapter name -> .onnx_adapter file.
    adapters: dict[str, Path] = field(default_factory=dict)
    # ONNX: the folder with genai_config.json, and (folder, graph) to serve with no adapter.
    model_dir: Path | None = None
    plain: tuple[Path, str] | None = None
    default_adapter: str | None = None

    def describe(self) -> str:
        return f"{KIND_WORDS[self.kind]} ({self.uri})"


def as_uri(location: str) -> str:
    """A plain path becomes file://<absolute path>/; URIs are kept."""
    if "://" in location:
        return location
    return Path(location).expanduser().resolve().as_uri() + "/"


def _folder_uri(uri: str) -> str:
    return uri if uri.endswith("/") else uri + "/"


def _read_local_manifest(path: Path) -> dict[str, Any] | None:
    from graft.storage import read_manifest

    manifest: dict[str, Any] | None = read_manifest(path.as_uri() + "/")
    return manifest


def _output_subfolder(manifest: Mapping[str, Any] | None) -> str | None:
    """A FineTuneJob output's runnable part: "adapter/" or "model/"."""
    if not manifest or manifest.get("kind") != "finetune-output":
        return None
    files = manifest.get("files") or {}
    if "adapter/adapter_config.json" in files:
        return "adapter/"
    if "model/config.json" in files:
        return "model/"
    return None


def fetch(location: str, field: str = "artifact", revision: str | None = None) -> Path:
    """A local folder for `location`: local folders as they are, remote ones downloaded into
    the cache; every folder with a manifest checked against it (IntegrityError)."""
    from graft.api.base import Location
    from graft_trainer.sources import fetch_model

    uri = as_uri(location)
    try:
        loc = Location(uri=uri, revision=revision)
    except ValueError as exc:
        first = str(exc).strip().splitlines()
        raise GraftInputError(
            f"{location}: not a location Graft can read ({first[-1].strip() if first else exc}); "
            "expected a path or an s3://, pvc://, file:// or hf:// URI"
        ) from None
    return fetch_model(loc, field=field)


def open_artifact(location: str) -> Artifact:
    """Fetch `location` and tell what it is (`detect`)."""
    from graft.storage import join_uri, local_path, open_store, parse_uri, read_manifest

    uri = as_uri(location)
    try:
        parsed = parse_uri(uri)
    except ValueError as exc:
        raise GraftInputError(f"{location}: {exc}") from None
    if parsed.scheme in ("s3",):
        manifest = read_manifest(_folder_uri(uri), open_store(_folder_uri(uri)))
        sub = _output_subfolder(manifest)
        if sub:
            return open_artifact(join_uri(_folder_uri(uri), sub))
    elif parsed.scheme != "hf":
        path = local_path(uri)
        if path is not None and not path.exists():
            raise GraftInputError(f"{location}: no such folder")
        if path is not None and path.is_file():
            raise GraftInputError(f"{location} is a file; {EXPECTED}, as a folder")
        if path is not None and path.is_dir():
            sub = _output_subfolder(_read_local_manifest(path))
            if sub:
                return open_artifact(join_uri(_folder_uri(uri), sub))
    folder = fetch(uri)
    return detect(folder, uri)


def _safetensors(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _inside(folder: Path, relative: str) -> Path:
    """`folder / relative` as a manifest names it, refused when it leads out of `folder`."""
    from graft.storage.store import contained_path

    return Path(contained_path(folder, relative.rstrip("/") or "."))


def detect(folder: Path, uri: str | None = None) -> Artifact:
    """What `folder` holds, or GraftInputError saying it is none of the runnable kinds."""
    from graft_trainer.export.stages import BASE_GRAPH, plain_base_location

    folder = Path(folder)
    uri = uri or str(folder)
    manifest = _read_local_manifest(folder)
    kind = (manifest or {}).get("kind")
    if kind == BUNDLE or (
        kind is None
        and (folder / "model" / "genai_config.json").is_file()
        and (folder / "adapters").is_dir()
    ):
        plain: tuple[Path, str] | None
        if manifest is not None:
            adapters = {
                str(a["name"]): _inside(folder, str(a["file"]))
                for a in manifest.get("adapters") or []
                if isinstance(a, dict) and a.get("name") and a.get("file")
            }
            model_dir = _inside(folder, str(manifest.get("model", "model/")))
            plain_dir, plain_file = plain_base_location(folder, manifest)
            plain = (_inside(folder, str(plain_dir.relative_to(folder))), plain_file)
        else:
            adapters = {p.stem: p for p in sorted((folder / "adapters").glob("*.onnx_adapter"))}
            model_dir = folder / "model"
            plain = (model_dir, BASE_GRAPH)
        if not (plain[0] / plain[1]).is_file() or "/" in plain[1]:
            plain = None
        return Artifact(BUNDLE, folder, uri, manifest, adapters, model_dir, plain)
    if (folder / "genai_config.json").is_file():
        adapters = {}
        default = None
        entry = (manifest or {}).get("adapter")
        if isinstance(entry, dict) and entry.get("file"):
            default = str(entry.get("activateAs") or "default")
            adapters[default] = _inside(folder, str(entry["file"]))
        plain = (folder, BASE_GRAPH) if (folder / BASE_GRAPH).is_file() else None
        return Artifact(ONNX, folder, uri, manifest, adapters, folder, plain, default)
    if (folder / "adapter_config.json").is_file():
        return Artifact(PEFT, folder, uri, manifest)
    if (folder / "config.json").is_file():
        if not _safetensors(folder):
            raise GraftInputError(
                f"{uri}: a Hugging Face model without safetensors weights; Graft loads weights "
                "only from safetensors (a pickled checkpoint can execute code)"
            )
        return Artifact(MODEL, folder, uri, manifest)
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    found = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "") if names else "nothing"
    raise GraftInputError(f"{uri} is not a model Graft can run: {EXPECTED}; found {found}")


# ---------------------------------------------------------------------------------------------
# Generation


@dataclass(frozen=True)
class Options:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    chat: bool = False

    @property
    def sample(self) -> bool:
        return self.temperature > 0


@dataclass
class Completion:
    text: str
    tokens: list[int]  # the generated ids, as the runtime's own generate returns them


class Runner(Protocol):
    description: str

    def generate(self, prompt: str, options: Options, on_text: OnText | None = None) -> Completion:
        """Generate after `prompt`, calling `on_text` with each piece of text as it comes."""
        ...


def check_options(options: Options) -> None:
    if options.max_new_tokens < 1:
        raise GraftInputError(f"--max-new-tokens must be at least 1, got {options.max_new_tokens}")
    if options.temperature < 0:
        raise GraftInputError(
            f"--temperature must be 0 (greedy) or more, got {options.temperature}"
        )
    if options.top_p is not None and not 0 < options.top_p <= 1:
        raise GraftInputError(f"--top-p must be in (0, 1], got {options.top_p}")
    if options.top_k is not None and options.top_k < 1:
        raise GraftInputError(f"--top-k must be at least 1, got {options.top_k}")


def _chat_template_of(model_dir: Path) -> str | None:
    """The chat template a tokenizer folder carries (chat_template.jinja or tokenizer_config)."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    return template if isinstance(template, str) and template.strip() else None


def _messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


class GenaiRunner:
    """onnxruntime-genai, loading (only) the adapter that is chosen."""

    def __init__(self, model_dir: Path, adapter: tuple[str, Path] | None, filename: str | None):
        from graft_trainer.export.validate import GenaiModel

        self.model_dir = Path(model_dir)
        self.adapter = adapter[0] if adapter else None
        try:
            self.genai = GenaiModel(self.model_dir, dict([adapter]) if adapter else None, filename)
        except RuntimeError as exc:  # onnxruntime-genai's errors: a broken or foreign folder
            what = f"adapter {adapter[0]!r} of " if adapter else ""
            raise GraftInputError(
                f"onnxruntime-genai cannot load {what}{self.model_dir}: {_first_line(exc)}"
            ) from None
        self.description = ""
        config = json.loads((self.model_dir / "genai_config.json").read_text())
        self.context_length = int(config.get("model", {}).get("context_length") or 0)
        self.template = _chat_template_of(self.model_dir)

    def _prompt(self, prompt: str, options: Options) -> str:
        if not options.chat:
            return prompt
        if self.template is None:
            raise GraftInputError(
                f"--chat: the tokenizer in {self.model_dir} has no chat template "
                "(chat_template.jinja or tokenizer_config.json's chat_template)"
            )
        tokenizer = self.genai.tokenizer
        return str(
            tokenizer.apply_chat_template(
                json.dumps(_messages(prompt)),
                template_str=self.template,
                add_generation_prompt=True,
            )
        )

    def generate(self, prompt: str, options: Options, on_text: OnText | None = None) -> Completion:
        og = self.genai._og
        ids = self.genai.encode(self._prompt(prompt, options))
        max_length = len(ids) + options.max_new_tokens
        if self.context_length and max_length > self.context_length:
            if len(ids) >= self.context_length:
                raise GraftInputError(
                    f"the prompt is {len(ids)} tokens, the model's context is {self.context_length}"
                )
            max_length = self.context_length
        # A sliding-window model (Gemma 2) needs a KV cache as long as its window, and og sizes
        # it by max_length: ask for at least that, and stop after max_new_tokens ourselves.
        max_length = max(max_length, int(getattr(self.genai, "min_max_length", 0) or 0))
        search: dict[str, Any] = {"do_sample": options.sample, "max_length": max_length}
        if options.sample:
            search["temperature"] = options.temperature
            if options.top_p is not None:
                search["top_p"] = options.top_p
            if options.top_k is not None:
                search["top_k"] = options.top_k
            if options.seed is not None:
                search["random_seed"] = options.seed
        params = og.GeneratorParams(self.genai.model)
        params.set_search_options(**search)
        generator = og.Generator(self.genai.model, params)
        if self.adapter is not None:
            generator.set_active_adapter(self.genai.adapters, self.adapter)
        generator.append_tokens(ids)
        stream = self.genai.tokenizer.create_stream()
        pieces: list[str] = []
        for _ in range(options.max_new_tokens):
            if generator.is_done():
                break
            generator.generate_next_token()
            piece = stream.decode(int(generator.get_next_tokens()[0]))
            if piece:
                pieces.append(piece)
                if on_text is not None:
                    on_text(piece)
        # The sequence as onnxruntime-genai keeps it (an end-of-sequence token is not in it).
        tokens = [int(t) for t in generator.get_sequence(0)][len(ids) :][: options.max_new_tokens]
        return Completion(text="".join(pieces), tokens=tokens)


class TorchRunner:
    """transformers (+ peft): a Hugging Face model, or a base with a LoRA adapter on it."""

    def __init__(
        self, model_dir: Path, adapter_dir: Path | None, tokenizer_dir: Path, device: str = "cpu"
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        warnings.filterwarnings("ignore", category=FutureWarning)
        self.torch = torch
        self.device = device
        dtype = torch.float32
        if device.startswith("cuda"):
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        try:
            model: Any = AutoModelForCausalLM.from_pretrained(
                str(model_dir), dtype=dtype, use_safetensors=True, trust_remote_code=False
            )
        except (OSError, ValueError) as exc:
            raise GraftInputError(
                f"cannot load the model in {model_dir}: {_first_line(exc)}"
            ) from None
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir))
        self.model = model.to(device).eval()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                str(tokenizer_dir), trust_remote_code=False
            )
        except (OSError, ValueError) as exc:
            raise GraftInputError(
                f"cannot load the tokenizer in {tokenizer_dir}: {_first_line(exc)}"
            ) from None
        self.description = ""

    def _prompt(self, prompt: str, options: Options) -> str:
        if not options.chat:
            return prompt
        if not getattr(self.tokenizer, "chat_template", None):
            raise GraftInputError(
                f"--chat: the tokenizer ({self.tokenizer.name_or_path}) has no chat template"
            )
        return str(
            self.tokenizer.apply_chat_template(
                _messages(prompt), tokenize=False, add_generation_prompt=True
            )
        )

    def generate(self, prompt: str, options: Options, on_text: OnText | None = None) -> Completion:
        from transformers import GenerationConfig, TextStreamer

        torch = self.torch
        tokenizer = self.tokenizer
        batch = tokenizer(self._prompt(prompt, options), return_tensors="pt").to(self.device)
        pieces: list[str] = []

        class Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if text:
                    pieces.append(text)
                    if on_text is not None:
                        on_text(text)

        base = self.model.generation_config
        config = GenerationConfig(
            max_new_tokens=options.max_new_tokens,
            do_sample=options.sample,
            eos_token_id=base.eos_token_id,
            bos_token_id=base.bos_token_id,
            pad_token_id=base.pad_token_id
            if base.pad_token_id is not None
            else tokenizer.pad_token_id,
        )
        if options.sample:
            config.temperature = options.temperature
            config.top_p = options.top_p if options.top_p is not None else 1.0
            config.top_k = options.top_k if options.top_k is not None else 50
            if options.seed is not None:
                torch.manual_seed(options.seed)
        streamer = Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        with torch.inference_mode():
            out = self.model.generate(**batch, generation_config=config, streamer=streamer)
        tokens = [int(t) for t in out[0][batch["input_ids"].shape[1] :]]
        return Completion(text="".join(pieces), tokens=tokens)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _torch_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _base_location(adapter: Artifact) -> tuple[str, str | None]:
    """Where the base model of a PEFT adapter is, from its adapter_config: (location, revision)."""
    config = json.loads((adapter.path / "adapter_config.json").read_text())
    name = config.get("base_model_name_or_path")
    if not isinstance(name, str) or not name:
        raise GraftInputError(
            f"{adapter.uri}: adapter_config.json names no base model; name it with --base URI"
        )
    if "://" in name:
        return name, None
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser()), None
    if HUB_ID.match(name):
        revision = config.get("revision")
        return f"hf://{name}", revision if isinstance(revision, str) and revision else None
    raise GraftInputError(
        f"{adapter.uri}: its base model {name!r} is not reachable from here (no such folder); "
        "name it with --base URI"
    )


def check_peft_adapter(adapter: Artifact) -> None:
    if not (adapter.path / "adapter_model.safetensors").is_file():
        raise GraftInputError(
            f"{adapter.uri}: no adapter_model.safetensors; Graft loads adapter weights only from "
            "safetensors (a pickled adapter_model.bin can execute code)"
        )


def load_base(adapter: Artifact, base: str | None) -> tuple[str, Path]:
    """The local folder of the PEFT adapter's base: `base` when given, else what its config
    names; refused when the adapter's manifest declares another base model digest. Returns
    (the location as named, the folder)."""
    from graft.storage import StoreError
    from graft_trainer.export.manifest import declared_base_digest, model_digest, same_digest

    location, revision = (base, None) if base else _base_location(adapter)
    try:
        folder = fetch(location, field="base model", revision=revision)
    except (GraftInputError, StoreError) as exc:
        if base:
            raise
        raise type(exc)(f"{_first_line(exc)}; name a reachable base with --base URI") from None
    declared = declared_base_digest(adapter.path)
    if declared:
        actual = model_digest(folder)
        if not same_digest(declared, actual) and (folder / "manifest.json").is_file():
            # A base that is itself an artifact: the trainer digests its manifest too.
            from graft_trainer.data import digest_files

            whole = "sha256:" + digest_files([p for p in folder.iterdir() if p.is_file()])
            actual = whole if same_digest(declared, whole) else actual
        if not same_digest(declared, actual):
            raise GraftInputError(
                f"{adapter.uri} was trained on base model {declared.removeprefix('sha256:')[:12]}, "
                f"but {location} is {actual.removeprefix('sha256:')[:12]}: not the same model"
            )
    return location, folder


def pick_adapter(artifact: Artifact, adapter: str | None, no_adapter: bool) -> str | None:
    """The adapter name to activate (None: the plain base)."""
    if adapter is None:
        return None if no_adapter else artifact.default_adapter
    if no_adapter:
        raise GraftInputError("--adapter and --no-adapter exclude each other")
    if artifact.kind not in (BUNDLE, ONNX):
        raise GraftInputError(
            f"--adapter picks an adapter of an AdapterBundle; {artifact.describe()} has none "
            "to pick"
        )
    if adapter not in artifact.adapters:
        names = ", ".join(sorted(artifact.adapters)) or "none"
        raise GraftInputError(
            f"no adapter {adapter!r} in {artifact.describe()}; its adapters: {names}"
        )
    return adapter


def load_runner(
    artifact: Artifact,
    *,
    adapter: str | None = None,
    no_adapter: bool = False,
    base: str | None = None,
    device: str = "auto",
) -> Runner:
    """A runner for `artifact` with the chosen adapter (or none)."""
    chosen = pick_adapter(artifact, adapter, no_adapter)
    if base is not None and artifact.kind != PEFT:
        raise GraftInputError(f"--base is for a PEFT adapter; {artifact.describe()} is not one")
    runner: GenaiRunner | TorchRunner
    if artifact.kind in (BUNDLE, ONNX):
        assert artifact.model_dir is not None
        if chosen is not None:
            path = artifact.adapters[chosen]
            runner = GenaiRunner(artifact.model_dir, (chosen, path), None)
            runner.description = f"{artifact.describe()}, adapter {chosen!r}"
        elif artifact.plain is not None:
            runner = GenaiRunner(artifact.plain[0], None, artifact.plain[1])
            names = ", ".join(sorted(artifact.adapters))
            more = f" (adapters: {names}; pick one with --adapter NAME)" if names else ""
            runner.description = f"{artifact.describe()}, no adapter{more}"
        else:
            runner = GenaiRunner(artifact.model_dir, None, None)
            runner.description = artifact.describe()
        return runner
    if artifact.kind == PEFT:
        check_peft_adapter(artifact)
        base_location, base_dir = load_base(artifact, base)
        has_tokenizer = any(
            (artifact.path / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")
        )
        runner = TorchRunner(
            base_dir,
            artifact.path,
            artifact.path if has_tokenizer else base_dir,
            _torch_device(device),
        )
        runner.description = f"{artifact.describe()} on {base_location}"
        return runner
    runner = TorchRunner(artifact.path, None, artifact.path, _torch_device(device))
    runner.description = artifact.describe()
    return runner


def generate_all(
    runner: Runner, items: Iterable[PromptItem], options: Options, on_text: OnText | None = None
) -> Iterator[tuple[PromptItem, Completion]]:
    for item in items:
        yield item, runner.generate(item.prompt, options, on_text)


# ---------------------------------------------------------------------------------------------
# The command


def run_command(args: Any, stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> int:
    """`graft generate` with parsed `args`; returns the exit code."""
    from graft.storage import StoreError
    from graft_trainer.errors import store_exit_code

    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        return _run(args, stdout, stderr)
    except GraftInputError as exc:
        stderr.write(f"error: {_first_line(exc)}\n")
        return 2
    except StoreError as exc:  # IntegrityError (3), access refused (2), an outage (1)
        stderr.write(f"error: {_first_line(exc)}\n")
        return store_exit_code(exc)


def _run(args: Any, stdout: IO[str], stderr: IO[str]) -> int:
    options = Options(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        chat=args.chat,
    )
    check_options(options)
    if bool(args.prompt) == bool(args.prompts):
        raise GraftInputError("give --prompt TEXT (one or more) or --prompts FILE.jsonl")
    if args.output and not args.prompts:
        raise GraftInputError("--output writes JSONL for --prompts FILE.jsonl")
    # Everything cheap first: the prompts, then the artifact, then the model.
    if args.prompts:
        items = read_prompts_file(args.prompts, args.field)
    else:
        items = [PromptItem(p, where="--prompt") for p in args.prompt]
    artifact = open_artifact(args.artifact)
    runner = load_runner(
        artifact,
        adapter=args.adapter,
        no_adapter=args.no_adapter,
        base=args.base,
        device=args.device,
    )
    if not args.quiet:
        stderr.write(f"graft generate: {runner.description}\n")
        stderr.flush()

    def stream(piece: str) -> None:
        stdout.write(piece)
        stdout.flush()

    if not args.prompts:
        for _item, _completion in generate_all(runner, items, options, stream):
            stdout.write("\n")
            stdout.flush()
        return 0
    if args.output is None:
        for item, completion in generate_all(runner, items, options):
            stdout.write(json.dumps(output_record(item, completion.text), ensure_ascii=False))
            stdout.write("\n")
            stdout.flush()
        return 0
    written = 0
    try:
        with Path(args.output).open("w", encoding="utf-8") as sink:
            for item, completion in generate_all(runner, items, options, stream):
                stdout.write("\n")
                stdout.flush()
                record = output_record(item, completion.text)
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                sink.flush()
                written += 1
    except OSError as exc:
        raise GraftInputError(f"cannot write {args.output}: {exc}") from None
    if not args.quiet:
        stderr.write(f"graft generate: {written} completions in {args.output}\n")
    return 0


def add_arguments(parser: Any) -> None:
    parser.add_argument(
        "artifact",
        metavar="ARTIFACT",
        help="an AdapterBundle, an exported ONNX model, a PEFT adapter, a Hugging Face model or "
        "a FineTuneJob's output: a path or an s3://, pvc://, file:// or hf:// URI",
    )
    parser.add_argument(
        "--prompt", action="append", help="a prompt (repeat for several); the answer streams"
    )
    parser.add_argument(
        "--prompts",
        metavar="FILE.jsonl",
        help="one JSON object per line with a prompt field ('-': standard input); one JSON "
        'line {"prompt": ..., "completion": ...} per prompt on stdout, or in --output',
    )
    parser.add_argument("--field", default="prompt", help="the prompt's field in --prompts")
    parser.add_argument("--output", metavar="FILE.jsonl", help="write the JSONL here")
    parser.add_argument("--adapter", metavar="NAME", help="the bundle's adapter to activate")
    parser.add_argument(
        "--no-adapter", action="store_true", help="serve the plain base of a bundle or export"
    )
    parser.add_argument(
        "--base", metavar="URI", help="the base model of a PEFT adapter (default: its config's)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="0 (the default) decodes greedily"
    )
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--seed", type=int, help="random seed when sampling")
    parser.add_argument(
        "--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template"
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="torch device for PEFT adapters and Hugging Face models (auto: cuda if present)",
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="nothing on stderr but errors")
