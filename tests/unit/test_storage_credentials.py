"""Per-bucket S3 credentials: a bucket mapped to a Secret's prefix uses that Secret's keys."""

from __future__ import annotations

import json

import pytest

from graft.storage.store import StoreAccessError, bucket_credentials, s3_client

ENV = {
    "AWS_ACCESS_KEY_ID": "ambient",
    "AWS_SECRET_ACCESS_KEY": "ambient-secret",
    "AWS_SESSION_TOKEN": "ambient-token",
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
    "GRAFT_S3_BUCKET_CREDENTIALS": json.dumps({"models": "GRAFT_SECRET_0_"}),
    "GRAFT_SECRET_0_AWS_ACCESS_KEY_ID": "models-key",
    "GRAFT_SECRET_0_AWS_SECRET_ACCESS_KEY": "models-secret",
    "GRAFT_SECRET_0_AWS_ENDPOINT_URL": "http://127.0.0.1:9100",
}


def test_a_mapped_bucket_takes_its_secrets_keys_as_a_set() -> None:
    own = bucket_credentials("models", ENV)
    assert own["AWS_ACCESS_KEY_ID"] == "models-key"
    assert own["AWS_ENDPOINT_URL"] == "http://127.0.0.1:9100"
    assert "AWS_SESSION_TOKEN" not in own  # the ambient token belongs to the ambient key
    other = bucket_credentials("results", ENV)
    assert other["AWS_ACCESS_KEY_ID"] == "ambient"
    assert other["AWS_SESSION_TOKEN"] == "ambient-token"
    broken = {**ENV, "GRAFT_S3_BUCKET_CREDENTIALS": "not json"}
    assert bucket_credentials("models", broken)["AWS_ACCESS_KEY_ID"] == "ambient"


def test_clients_sign_with_the_buckets_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    models = s3_client(bucket="models")
    assert models._get_credentials().access_key == "models-key"
    assert models.meta.endpoint_url == "http://127.0.0.1:9100"
    results = s3_client(bucket="results")
    assert results._get_credentials().access_key == "ambient"
    assert results.meta.endpoint_url == "http://127.0.0.1:9000"


def test_the_addressing_style_is_path_unless_a_bucket_or_the_environment_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("GRAFT_SECRET_0_AWS_S3_ADDRESSING_STYLE", "virtual")
    monkeypatch.setenv("GRAFT_SECRET_0_AWS_ENDPOINT_URL", "http://store.test:9100")  # not an IP
    assert s3_client(bucket="results").meta.config.s3["addressing_style"] == "path"
    models = s3_client(bucket="models")
    assert models.meta.config.s3["addressing_style"] == "virtual"
    # the request itself goes to the bucket-named host
    url = models.generate_presigned_url("get_object", {"Bucket": "models", "Key": "a"})
    assert url.startswith("http://models.store.test:9100/a?"), url
    monkeypatch.setenv("AWS_S3_ADDRESSING_STYLE", "sideways")
    with pytest.raises(StoreAccessError, match=r"AWS_S3_ADDRESSING_STYLE is 'sideways'.*path"):
        s3_client(bucket="results")


def test_an_hf_repository_uses_its_own_secrets_token() -> None:
    from graft.storage.store import hf_token

    env = {
        "HF_TOKEN": "ambient",
        "GRAFT_HF_TOKENS": json.dumps(
            {"acme/llm": "GRAFT_SECRET_0_HF_TOKEN", "acme/data": "GRAFT_SECRET_1_HF_TOKEN"}
        ),
        "GRAFT_SECRET_0_HF_TOKEN": "acme-token",
    }
    assert hf_token("acme/llm", env) == "acme-token"
    # Mapped, but its Secret has no HF_TOKEN (the reference is optional): the plain one.
    assert hf_token("acme/data", env) == "ambient"
    assert hf_token("other/repo", env) == "ambient"
    assert hf_token("acme/llm", {**env, "GRAFT_HF_TOKENS": "not json"}) == "ambient"
    assert hf_token("acme/llm", {}) is None
