from __future__ import annotations

from graft.naming import artifact_prefix, child_name


def test_artifact_prefix_is_stable_and_unique_per_uid() -> None:
    uid = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
    first = artifact_prefix("s3://bucket/teams/a/", "ml", "FineTuneJob", "tone", uid)
    assert first == "s3://bucket/teams/a/ml/finetunejobs/tone-0f1e2d3c/"
    assert first == artifact_prefix("s3://bucket/teams/a", "ml", "FineTuneJob", "tone", uid)
    other = artifact_prefix("s3://bucket/teams/a", "ml", "FineTuneJob", "tone", "9" * 32)
    assert other != first


def test_child_names_fit_the_label_limit() -> None:
    assert child_name("tone", "train") == "tone-train"
    long = child_name("a" * 52, "trial-123")
    assert len(long) <= 63
    assert long == child_name("a" * 52, "trial-123")
    assert long != child_name("a" * 52, "trial-124")
