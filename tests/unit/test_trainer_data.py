"""Pure data handling of the trainer: reading files, splits, stratification, templates,
completion-only masks, packing and batch order."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from graft_trainer import data as D
from graft_trainer.errors import GraftInputError
from graft_trainer.testkit import VERDICTS, label_of, tone_records, write_tone_dataset


class CharTokenizer:
    """One token per character; eos = 1. Enough to check masks and lengths."""

    eos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_format_reads_the_same_records(tmp_path: Path, suffix: str) -> None:
    path = write_tone_dataset(tmp_path / f"d{suffix}", n=30, seed=3)
    splits = D.read_records(path, D.detect_format(path, "auto"))
    assert splits["train"] == tone_records(30, 3)


def test_testkit_labels_follow_the_phrase_and_its_chat_prompt() -> None:
    records = tone_records(90, 4)
    assert Counter(r["tone"] for r in records) == {"positive": 30, "negative": 30, "neutral": 30}
    for r in records:
        assert r["verdict"] == VERDICTS[r["tone"]]
        assert label_of(r["phrase"]) == r["tone"]
        prompt = f"<|user|>\n{r['phrase']}<|end|>\n<|assistant|>\n"
        assert label_of(prompt, "verdict") == r["verdict"]
    # a phrase without a tone word of the kit has no right answer
    assert label_of("<|user|>\nWhat a day<|end|>\n<|assistant|>\n") is None


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv"])
def test_non_utf8_data_names_file_line_and_column(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"latin1.{fmt}"
    good = {"jsonl": '{"a": "ok"}\n', "json": "[\n", "csv": "a,b\n"}[fmt]
    path.write_bytes(good.encode() + "caf\u00e9 ok".encode() + "\n na\u00efve".encode("latin-1"))
    with pytest.raises(
        GraftInputError, match=r"latin1\.\w+:3: not UTF-8 \(byte 0xef at column 4\)"
    ):
        D.read_records(path, fmt)


def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": \n')
    with pytest.raises(GraftInputError, match=r"bad\.jsonl:3: malformed JSON"):
        D.read_records(path, "jsonl")
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(GraftInputError, match=r"bad\.jsonl:2: expected a JSON object"):
        D.read_records(path, "jsonl")


def test_csv_row_with_wrong_column_count_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("phrase,tone\nhello,positive\nbroken row,negative,extra\n")
    with pytest.raises(GraftInputError, match=r"bad\.csv:3: expected 2 columns"):
        D.read_records(path, "csv")


def test_unknown_extension_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(GraftInputError, match="cannot tell the format"):
        D.detect_format(tmp_path / "data.txt", "auto")


def test_split_syntax_percent_absolute_and_sum() -> None:
    rows = [{"i": i} for i in range(10)]
    splits = {"train": rows, "test": rows[:4]}
    assert [r["i"] for r in D.select_split(splits, "train[:30%]")] == [0, 1, 2]
    assert [r["i"] for r in D.select_split(splits, "train[80%:]")] == [8, 9]
    assert [r["i"] for r in D.select_split(splits, "train[2:4]+test[-1:]")] == [2, 3, 3]
    with pytest.raises(GraftInputError, match="no split 'validation'"):
        D.select_split(splits, "validation")


def test_stratified_split_keeps_the_label_mix() -> None:
    # Sorted by label: a plain slice would put only one label into eval.
    rows = [{"x": i, "tone": t} for t in ("a", "b", "c") for i in range(20)]
    splits = {"train": rows}
    plain = D.select_split(splits, "train[80%:]")
    assert set(r["tone"] for r in plain) == {"c"}
    train, evals = D.stratified_splits(splits, "train[:80%]", "train[80%:]", "tone")
    assert Counter(r["tone"] for r in evals) == {"a": 4, "b": 4, "c": 4}
    assert Counter(r["tone"] for r in train) == {"a": 16, "b": 16, "c": 16}
    assert not {id(r) for r in train} & {id(r) for r in evals}


def test_stratify_needs_slices_of_one_split_and_the_label() -> None:
    with pytest.raises(GraftInputError, match="slices of one split"):
        D.stratified_splits({"train": [], "test": []}, "train", "test", "tone")
    with pytest.raises(GraftInputError, match="record 1: stratifyBy field 'tone' is missing"):
        D.stratified_splits(
            {"train": [{"tone": "a"}, {"x": 1}]}, "train[:50%]", "train[50%:]", "tone"
        )


def test_template_rendering_and_missing_field() -> None:
    template = "Q: {phrase}\nA: {tone}."
    assert D.render_template(template, {"phrase": "hi", "tone": "neutral"}) == "Q: hi\nA: neutral."
    assert D.split_template(template) == ("Q: {phrase}\nA: ", "tone", ".")
    records = [{"phrase": "a", "tone": "b"}, {"phrase": "c"}]
    with pytest.raises(GraftInputError, match=r"row 1: textTemplate field \{tone\} is missing"):
        D.check_template_fields(template, records, "trainSplit 'train'")


def _spec(**kw: object) -> D.DatasetSpec:
    base = {"uri": "file:///d.jsonl", "textTemplate": "Q: {phrase}\nA: {tone}"}
    base.update(kw)
    return D.DatasetSpec.model_validate(base)


def test_completion_only_masks_the_prompt() -> None:
    tok = CharTokenizer()
    texts = D.record_texts(_spec(completionOnly=True), {"phrase": "hi", "tone": "ok"}, 0)
    assert (texts.prompt, texts.completion, texts.reference) == ("Q: hi\nA: ", "ok", "ok")
    ex = D.tokenize_record(texts, tok, 64, completion_only=True)
    assert ex.input_ids == [ord(c) for c in "Q: hi\nA: ok"] + [1]
    assert ex.labels == [-100] * len("Q: hi\nA: ") + [ord("o"), ord("k"), 1]
    full = D.tokenize_record(texts, tok, 64, completion_only=False)
    assert full.labels == full.input_ids


def test_truncation_to_max_seq_length() -> None:
    texts = D.PromptText("x" * 20, "y" * 20)
    ex = D.tokenize_record(texts, CharTokenizer(), 16, completion_only=False)
    assert len(ex.input_ids) == len(ex.labels) == 16 and ex.truncated


def test_packing_restarts_positions_and_never_predicts_across_texts() -> None:
    examples = [
        D.Example([5, 6, 7], [5, 6, 7]),
        D.Example([8, 9], [8, 9]),
        D.Example([4] * 6, [4] * 6),
    ]
    rows = D.pack_examples(examples, 6)
    assert [[len(e) for e in r] for r in rows] == [[3, 2], [6]]
    batch = D.collate_packed(rows, pad_id=0)
    assert batch.input_ids[0] == [5, 6, 7, 8, 9, 0]
    assert batch.position_ids is not None and batch.position_ids[0] == [0, 1, 2, 0, 1, 0]
    assert batch.labels[0] == [-100, 6, 7, -100, 9, -100]
    assert batch.tokens == 11 and batch.target_tokens == 2 + 1 + 5


def test_padded_batch_masks_padding() -> None:
    batch = D.collate_padded([D.Example([1, 2, 3], [-100, 2, 3]), D.Example([4], [4])], pad_id=0)
    assert batch.input_ids == [[1, 2, 3], [4, 0, 0]]
    assert batch.attention_mask == [[1, 1, 1], [1, 0, 0]]
    assert batch.labels[1] == [4, -100, -100]
    assert batch.target_tokens == 2


def test_batch_order_is_deterministic_and_resumable() -> None:
    train = [D.Example([1] * (i % 7 + 1), [1] * (i % 7 + 1)) for i in range(50)]
    data = D.TrainData(train, [], [], 50, 0)
    full = [(i, b.input_ids) for i, b in _take(data.batches(7, 4, 0), 30)]
    resumed = [(i, b.input_ids) for i, b in _take(data.batches(7, 4, 0, start=17), 13)]
    assert resumed == full[17:]
    # every example appears once per epoch
    per_epoch = data.batches_per_epoch(4)
    seen = sum(len(b) for _, b in full[:per_epoch])
    assert seen == 50
    other_seed = [b.input_ids for _, b in _take(data.batches(8, 4, 0), 5)]
    assert other_seed != [b for _, b in full[:5]]


def _take(it, n):  # type: ignore[no-untyped-def]
    return [next(it) for _ in range(n)]


def test_testkit_dataset_is_deterministic_and_balanced(tmp_path: Path) -> None:
    a = write_tone_dataset(tmp_path / "a.jsonl", n=90, seed=1).read_text()
    b = write_tone_dataset(tmp_path / "b.jsonl", n=90, seed=1).read_text()
    assert a == b
    tones = Counter(json.loads(line)["tone"] for line in a.splitlines())
    assert tones == {"positive": 30, "negative": 30, "neutral": 30}


def test_flattened_batches_are_not_grouped_by_length() -> None:
    """Flattened micro-batches have no padding to save: drawn at random (as unflattened ones
    without grouping), so the longest texts do not all land in one batch (the peak memory)."""
    from graft_trainer.data import Example, TrainData, epoch_order

    train = [Example(list(range(n)), list(range(n))) for n in range(3, 403, 4)]
    data = TrainData(train, [], [], len(train), 0)
    it = data.batches(7, 4, 0, flatten=True)
    drawn = [next(it)[1] for _ in range(len(train) // 4)]
    expected = epoch_order(len(train), 7, 0, 4, None)
    assert [b.seq_starts[-1] for b in drawn] == [
        sum(len(train[i]) for i in batch) for batch in expected
    ]
    padded = data.batches(7, 4, 0)
    grouped = epoch_order(len(train), 7, 0, 4, [len(e) for e in train])
    assert next(padded)[1].tokens == sum(len(train[i]) for i in grouped[0])
