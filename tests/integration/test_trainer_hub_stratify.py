"""stratifyBy on an hf:// dataset: the split both expressions slice is loaded whole from the
Hub snapshot and cut per label group, as for files in S3 (it used to be ignored there)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.hub_server import HubServer
from tests.integration.test_trainer_hub import child_env
from tests.integration.trainer_kit import shared_kit

pytestmark = [pytest.mark.trainer]

SELECT = """
import json, sys
from graft.api.finetune import FineTuneJobSpec
from graft_trainer import sources
from graft_trainer.errors import GraftInputError
from graft_trainer.preflight import select_records

out = []
for dataset in json.loads(sys.argv[1]):
    spec = FineTuneJobSpec.model_validate(
        {"model": {"uri": "hf://acme/tiny-llama"}, "dataset": dataset,
         "output": {"uri": "file:///tmp/unused/"}}
    )
    try:
        splits, _ = sources.load_splits(spec.dataset)
        train, evals = select_records(spec, splits)
        out.append({"train": [r["tone"] for r in train], "eval": [r["tone"] for r in evals]})
    except GraftInputError as exc:
        out.append({"error": str(exc)})
print(json.dumps(out))
"""


def test_stratify_by_keeps_each_labels_share_in_both_hub_splits(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in shared_kit()["dataset"].read_text().splitlines()]
    # Sorted by label, so a plain 80/20 slice would leave the last label(s) out of train.
    rows.sort(key=lambda r: str(r["tone"]))
    base = {"uri": "hf://acme/sorted", "format": "hf", "textTemplate": "{phrase} -> {tone}"}
    with HubServer() as hub:
        hub.publish(
            "acme/sorted",
            {"data/train.jsonl": "".join(json.dumps(r) + "\n" for r in rows).encode()},
            repo_type="dataset",
        )
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                SELECT,
                json.dumps(
                    [
                        {
                            **base,
                            "trainSplit": "train[:80%]",
                            "evalSplit": "train[80%:]",
                            "stratifyBy": "tone",
                        },
                        {**base, "trainSplit": "train[:80%]", "evalSplit": "train[80%:]"},
                        {**base, "trainSplit": "train", "evalSplit": "test", "stratifyBy": "tone"},
                    ]
                ),
            ],
            env=child_env(hub, tmp_path),
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    stratified, plain, unsliced = json.loads(done.stdout.strip().splitlines()[-1])
    everything = Counter(str(r["tone"]) for r in rows)
    assert len(everything) >= 2, everything
    train, evals = Counter(stratified["train"]), Counter(stratified["eval"])
    assert train + evals == everything  # every record once, none lost
    for label, count in everything.items():
        # each label split 80/20 within itself
        assert train[label] == round(0.8 * count), (label, train, evals)
    # the same slices without stratifyBy miss labels: what stratifyBy is for
    assert set(plain["eval"]) != set(everything) or set(plain["train"]) != set(everything)
    assert (
        "stratifyBy needs trainSplit and evalSplit to be slices of one split" in (unsliced["error"])
    )
