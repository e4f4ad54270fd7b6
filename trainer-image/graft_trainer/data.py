"""Datasets: read records, select splits, render texts, tokenize with loss masks, pack.

Everything here is plain Python over lists of dicts (and token id lists), so it is cheap to
test; only `fetch_dataset` touches a store and only `load_hf_split` imports `datasets`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graft.api.finetune import DatasetSpec, template_fields
from graft_trainer.errors import GraftInputError

Record = dict[str, Any]
FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

# ---------------------------------------------------------------- reading files


def detect_format(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    suffixes = [s for s in path.suffixes if s in FORMATS]
    if not suffixes:
        raise GraftInputError(
            f"{path.name}: cannot tell the format from the extension "
            "(expected .jsonl, .json, .csv or .parquet, or set dataset.format)"
        )
    return FORMATS[suffixes[-1]]


def read_records(path: Path, fmt: str) -> dict[str, list[Record]]:
    """Records of one file, keyed by split name (files hold one split, `train`, unless a JSON
    object maps split names to lists). Text formats must be UTF-8: anything else is refused
    with the file, line and column of the first byte that is not."""
    try:
        return _read_records(path, fmt)
    except UnicodeDecodeError:
        lineno, column, byte = _first_undecodable(path)
        raise GraftInputError(
            f"{path}:{lineno}: not UTF-8 (byte 0x{byte:02x} at column {column}); expected a "
            f"UTF-8 {fmt} file (re-encode it, e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _first_undecodable(path: Path) -> tuple[int, int, int]:
    """(line, column, byte) of the first byte of `path` that is not valid UTF-8."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                column = len(raw[: exc.start].decode("utf-8")) + 1
                return lineno, column, raw[exc.start]
    return 0, 0, 0


def _read_records(path: Path, fmt: str) -> dict[str, list[Record]]:
    if fmt == "jsonl":
        return {"train": _read_jsonl(path)}
    if fmt == "json":
        return _read_json(path)
    if fmt == "csv":
        return {"train": _read_csv(path)}
    if fmt == "parquet":
        return {"train": _read_parquet(path)}
    raise GraftInputError(f"{path.name}: unsupported format {fmt!r}")


def _read_jsonl(path: Path) -> list[Record]:
    records: list[Record] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise GraftInputError(
                    f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno}); "
                    "expected one JSON object per line"
                ) from None
            if not isinstance(value, dict):
                raise GraftInputError(
                    f"{path}:{lineno}: expected a JSON object per line, got {type(value).__name__}"
                )
            records.append(value)
    return records


def _read_json(path: Path) -> dict[str, list[Record]]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise GraftInputError(
            f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})"
        ) from None
    if isinstance(value, list):
        splits = {"train": value}
    elif isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        splits = value
    else:
        raise GraftInputError(
            f"{path}: expected a JSON list of objects, or an object mapping split names to lists"
        )
    for name, rows in splits.items():
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise GraftInputError(
                    f"{path}: split {name!r} item {i}: expected an object, got {type(row).__name__}"
                )
    return splits


def _read_csv(path: Path) -> list[Record]:
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            return []
        except csv.Error as exc:
            raise GraftInputError(f"{path}:1: malformed CSV header ({exc})") from None
        records: list[Record] = []
        try:
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise GraftInputError(
                        f"{path}:{reader.line_num}: expected {len(header)} columns "
                        f"({', '.join(header)}), got {len(row)}"
                    )
                records.append(dict(zip(header, row, strict=True)))
        except csv.Error as exc:
            raise GraftInputError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
    return records


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise GraftInputError(f"{path}: not a readable parquet file ({exc})") from None
    rows: list[Record] = table.to_pylist()
    return rows


# ---------------------------------------------------------------- split syntax

_PART = re.compile(
    r"^(?P<name>[A-Za-z_][\w.-]*)(\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?"
    r"(\((?P<rounding>closest|pct1_dropremainder)\))?$"
)


@dataclass(frozen=True)
class SplitPart:
    name: str
    start: str | None
    stop: str | None
    rounding: str = "closest"


def parse_split(expr: str) -> list[SplitPart]:
    parts = []
    for text in expr.split("+"):
        match = _PART.match(text.strip())
        if not match:
            raise GraftInputError(
                f"split {expr!r}: expected datasets' split syntax such as 'train[:90%]'"
            )
        parts.append(
            SplitPart(match["name"], match["start"], match["stop"], match["rounding"] or "closest")
        )
    return parts


def _bound(text: str | None, n: int, rounding: str) -> int | None:
    if text is None:
        return None
    if text.endswith("%"):
        pct = int(text[:-1])
        if rounding == "pct1_dropremainder":
            return (n // 100) * pct
        return round(pct * n / 100.0)
    return int(text)


def slice_records(records: Sequence[Record], part: SplitPart) -> list[Record]:
    n = len(records)
    start = _bound(part.start, n, part.rounding)
    stop = _bound(part.stop, n, part.rounding)
    return list(records[slice(start, stop)])


def select_split(splits: dict[str, list[Record]], expr: str) -> list[Record]:
    out: list[Record] = []
    for part in parse_split(expr):
        if part.name not in splits:
            raise GraftInputError(
                f"split {expr!r}: the data has no split {part.name!r} "
                f"(it has: {', '.join(sorted(splits))})"
            )
        out.extend(slice_records(splits[part.name], part))
    return out


def stratified_source(train_expr: str, eval_expr: str) -> str:
    """The one split that stratified trainSplit and evalSplit expressions both slice."""
    train_parts, eval_parts = parse_split(train_expr), parse_split(eval_expr)
    if len(train_parts) != 1 or len(eval_parts) != 1 or train_parts[0].name != eval_parts[0].name:
        raise GraftInputError(
            "stratifyBy needs trainSplit and evalSplit to be slices of one split, "
            "e.g. 'train[:90%]' and 'train[90%:]'"
        )
    return train_parts[0].name


def stratified_splits(
    splits: dict[str, list[Record]], train_expr: str, eval_expr: str, label: str
) -> tuple[list[Record], list[Record]]:
    """Apply the same slices to each label group, so both splits keep the label mix."""
    name = stratified_source(train_expr, eval_expr)
    train_parts, eval_parts = parse_split(train_expr), parse_split(eval_expr)
    if name not in splits:
        raise GraftInputError(f"split {train_expr!r}: the data has no split {name!r}")
    groups: dict[str, list[tuple[int, Record]]] = {}
    for i, record in enumerate(splits[name]):
        if label not in record:
            raise GraftInputError(
                f"record {i}: stratifyBy field {label!r} is missing "
                f"(the record has: {', '.join(map(str, record))})"
            )
        groups.setdefault(str(record[label]), []).append((i, record))
    train: list[tuple[int, Record]] = []
    evals: list[tuple[int, Record]] = []
    for members in groups.values():
        train.extend(slice_records(members, train_parts[0]))  # type: ignore[arg-type]
        evals.extend(slice_records(members, eval_parts[0]))  # type: ignore[arg-type]
    return [r for _, r in sorted(train, key=lambda t: t[0])], [
        r for _, r in sorted(evals, key=lambda t: t[0])
    ]


# ---------------------------------------------------------------- templates


def render_template(template: str, record: Record, row: int | None = None) -> str:
    try:
        return template.format_map({k: "" if v is None else v for k, v in record.items()})
    except KeyError as exc:
        where = f"row {row}" if row is not None else "a record"
        raise GraftInputError(
            f"{where}: textTemplate field {{{exc.args[0]}}} is missing from the data "
            f"(the record has: {', '.join(map(str, record))})"
        ) from None


def split_template(template: str, field_name: str | None = None) -> tuple[str, str, str]:
    """(prompt template, completion field, suffix template): the template cut at the last
    field's placeholder (or at `field_name`'s)."""
    fields = template_fields(template)
    name = field_name or fields[-1]
    marker = "{" + name + "}"
    cut = template.rfind(marker)
    if cut < 0:
        raise GraftInputError(f"textTemplate has no {marker} placeholder")
    return template[:cut], name, template[cut + len(marker) :]


def check_template_fields(template: str, records: Sequence[Record], where: str) -> None:
    fields = template_fields(template)
    for i, record in enumerate(records):
        missing = [f for f in fields if f not in record]
        if missing:
            raise GraftInputError(
                f"{where} row {i}: textTemplate field {{{missing[0]}}} is missing from the data "
                f"(the record has: {', '.join(map(str, record)) or 'no fields'})"
            )


# ---------------------------------------------------------------- tokenization


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class PromptText:
    """The prompt and completion of one record, for masking and for generation."""

    prompt: str
    completion: str
    reference: str | None = None


def record_texts(
    spec: DatasetSpec,
    record: Record,
    row: int,
    tokenizer: Any = None,
    label_field: str | None = None,
) -> PromptText:
    """Split a record into prompt and completion text (completion = what the loss is on)."""
    if spec.chat_template:
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise GraftInputError(
                f"row {row}: chatTemplate needs a non-empty `messages` list of "
                "{role, content} objects"
            )
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if messages[-1].get("role") == "assistant":
            prompt = tokenizer.apply_chat_template(
                messages[:-1], tokenize=False, add_generation_prompt=True
            )
            reference = str(messages[-1].get("content", ""))
        else:
            prompt, reference = "", None
        if label_field and label_field in record:
            reference = str(record[label_field])
        if not full.startswith(prompt):
            prompt = ""
        return PromptText(prompt, full[len(prompt) :], reference)
    assert spec.text_template is not None
    prompt_t, field_name, _ = split_template(spec.text_template, label_field)
    full = render_template(spec.text_template, record, row)
    prompt = render_template(prompt_t, record, row)
    reference = str(record[field_name]) if field_name in record else None
    return PromptText(prompt, full[len(prompt) :], reference)


def tokenize_record(
    texts: PromptText,
    tokenizer: Any,
    max_length: int,
    completion_only: bool,
    add_eos: bool = True,
) -> Example:
    """Token ids of prompt + completion; labels -100 on the prompt when completion_only."""
    prompt_ids: list[int] = tokenizer(texts.prompt, add_special_tokens=True)["input_ids"]
    completion_ids: list[int] = tokenizer(texts.completion, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None and (not completion_ids or completion_ids[-1] != eos):
        completion_ids = [*completion_ids, eos]
    ids = prompt_ids + completion_ids
    labels = ([-100] * len(prompt_ids) if completion_only else list(prompt_ids)) + completion_ids
    truncated = len(ids) > max_length
    return Example(ids[:max_length], labels[:max_length], truncated)


def pack_examples(examples: Sequence[Example], max_length: int) -> list[list[Example]]:
    """Greedy first-fit packing of examples (in order) into rows of at most max_length tokens."""
    rows: list[list[Example]] = []
    current: list[Example] = []
    used = 0
    for ex in examples:
        if current and used + len(ex) > max_length:
            rows.append(current)
            current, used = [], 0
        current.append(ex)
        used += len(ex)
    if current:
        rows.append(current)
    return rows


# ---------------------------------------------------------------- batching


@dataclass
class Batch:
    """One micro-batch as plain lists; `tensors()` turns it into model inputs."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    position_ids: list[list[int]] | None = None
    attention_mask: list[list[int]] | None = None
    tokens: int = 0  # real (non-pad) tokens
    target_tokens: int = 0  # tokens that carry a label
    seq_starts: list[int] | None = None  # one flattened row: where each text starts (+ end)

    def tensors(self, device: Any) -> dict[str, Any]:
        import torch

        # use_cache=False: no KV cache in training, and transformers only detects packed
        # sequences (block-diagonal attention from restarting position ids) without one.
        out: dict[str, Any] = {
            "use_cache": False,
            "input_ids": torch.tensor(self.input_ids, dtype=torch.long, device=device),
            "labels": torch.tensor(self.labels, dtype=torch.long, device=device),
        }
        if self.position_ids is not None:
            out["position_ids"] = torch.tensor(self.position_ids, dtype=torch.long, device=device)
        if self.attention_mask is not None:
            out["attention_mask"] = torch.tensor(
                self.attention_mask, dtype=torch.long, device=device
            )
        if self.seq_starts is not None:
            starts = torch.tensor(self.seq_starts, dtype=torch.int32, device=device)
            longest = max(b - a for a, b in zip(self.seq_starts, self.seq_starts[1:], strict=False))
            out.update(
                cu_seq_lens_q=starts,
                cu_seq_lens_k=starts,
                max_length_q=longest,
                max_length_k=longest,
            )
        return out


def target_count(labels: list[int]) -> int:
    """The tokens of `labels` the loss is taken on (the model predicts token t+1 from t: the
    first label never counts)."""
    return sum(1 for x in labels[1:] if x != -100)


def collate_padded(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-padded batch with an attention mask."""
    width = max(len(e) for e in examples)
    ids, labels, mask = [], [], []
    for e in examples:
        pad = width - len(e)
        ids.append(e.input_ids + [pad_id] * pad)
        labels.append(e.labels + [-100] * pad)
        mask.append([1] * len(e) + [0] * pad)
    return Batch(
        ids,
        labels,
        attention_mask=mask,
        tokens=sum(len(e) for e in examples),
        target_tokens=sum(target_count(e.labels) for e in examples),
    )


def collate_packed(rows: Sequence[Sequence[Example]], pad_id: int) -> Batch:
    """Each row is several examples back to back; position ids restart at every example so
    attention stays within it. Rows are padded with a filler segment of their own."""
    width = max(sum(len(e) for e in row) for row in rows)
    ids, labels, positions = [], [], []
    tokens = targets = 0
    for row in rows:
        r_ids: list[int] = []
        r_labels: list[int] = []
        r_pos: list[int] = []
        for e in row:
            r_ids += e.input_ids
            r_labels += [-100, *e.labels[1:]]  # never predict across a boundary
            r_pos += list(range(len(e)))
            tokens += len(e)
            targets += target_count(e.labels)
        pad = width - len(r_ids)
        r_ids += [pad_id] * pad
        r_labels += [-100] * pad
        r_pos += list(range(pad))
        ids.append(r_ids)
        labels.append(r_labels)
        positions.append(r_pos)
    return Batch(ids, labels, position_ids=positions, tokens=tokens, target_tokens=targets)


def collate_flat(examples: Sequence[Example]) -> Batch:
    """A micro-batch as one row without padding: the texts back to back, position ids
    restarting at each, and the sequence starts for block-diagonal attention."""
    batch = collate_packed([list(examples)], pad_id=0)
    starts = [0]
    for e in examples:
        starts.append(starts[-1] + len(e))
    batch.seq_starts = starts
    return batch


def epoch_order(
    n: int, seed: int, epoch: int, batch_size: int, lengths: Sequence[int] | None
) -> list[list[int]]:
    """Batches of indices for one epoch: shuffled by (seed, epoch); with `lengths`, grouped by
    length inside mega-batches of 50 batches (less padding, same randomness per batch)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(n))
    rng.shuffle(order)
    if lengths is not None:
        mega = batch_size * 50
        grouped: list[int] = []
        for i in range(0, n, mega):
            chunk = sorted(order[i : i + mega], key=lambda j: -lengths[j])
            grouped.extend(chunk)
        order = grouped
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if lengths is not None:
        rng.shuffle(batches)
    return batches


@dataclass
class TrainData:
    """Tokenized training and eval data plus what the report says about it."""

    train: list[Example]
    eval: list[Example]
    eval_texts: list[PromptText]
    train_records: int
    eval_records: int
    packed_rows: list[list[Example]] | None = None
    truncated: int = 0
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    sample_texts: list[str] = field(default_factory=list)

    @property
    def units(self) -> int:
        """Items the batcher draws from: packed rows or examples."""
        return len(self.packed_rows) if self.packed_rows is not None else len(self.train)

    def batches(
        self, seed: int, batch_size: int, pad_id: int, start: int = 0, flatten: bool = False
    ) -> Iterator[tuple[int, Batch]]:
        """(micro-batch index, batch) forever, from global micro-batch `start` on. The order
        depends only on the seed, so a resumed run sees exactly the batches it would have."""
        n = self.units
        # Grouping by length only saves padding; flattened batches have none, and grouping
        # would put the longest texts together (the peak memory of a step is its longest batch).
        group = self.packed_rows is None and not flatten
        lengths = [len(e) for e in self.train] if group else None
        per_epoch = (n + batch_size - 1) // batch_size
        index = start
        while True:
            epoch, pos = divmod(index, per_epoch)
            order = epoch_order(n, seed, epoch, batch_size, lengths)
            for b in order[pos:]:
                if self.packed_rows is not None:
                    yield index, collate_packed([self.packed_rows[i] for i in b], pad_id)
                elif flatten:
                    yield index, collate_flat([self.train[i] for i in b])
                else:
                    yield index, collate_padded([self.train[i] for i in b], pad_id)
                index += 1

    def batches_per_epoch(self, batch_size: int) -> int:
        return (self.units + batch_size - 1) // batch_size


def digest_files(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
