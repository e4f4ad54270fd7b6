"""A store that refuses (no such bucket, wrong credentials, read-only keys) fails at once and is
not retried; a store that is down is retried. The write check runs before any training, so
read-only credentials fail in seconds, not at the first checkpoint."""

from __future__ import annotations

import boto3
import pytest
from botocore.stub import Stubber

from graft.storage import S3Store, StoreAccessError, StoreError
from graft_trainer.errors import EXIT_FAILURE, EXIT_INVALID, store_exit_code

PREFIX = "s3://graft/team-a/finetunejobs/tune-1234/"


def stubbed() -> tuple[S3Store, Stubber]:
    client = boto3.client(
        "s3",
        region_name="us-east-1",
        endpoint_url="http://127.0.0.1:1",
        aws_access_key_id="k",
        aws_secret_access_key="s",
    )
    return S3Store(client), Stubber(client)


def test_read_only_credentials_fail_the_write_check_as_a_refusal() -> None:
    store, stub = stubbed()
    stub.add_response("head_bucket", {}, {"Bucket": "graft"})
    stub.add_client_error("put_object", "AccessDenied", "Access Denied", 403)
    with stub, pytest.raises(StoreAccessError) as refused:
        store.check(PREFIX, write=True)
    assert f"writing to {PREFIX} failed: AccessDenied" in str(refused.value)
    assert store_exit_code(refused.value) == EXIT_INVALID


def test_the_write_check_leaves_nothing_behind() -> None:
    store, stub = stubbed()
    probe = "team-a/finetunejobs/tune-1234/.graft-write-check"
    stub.add_response("head_bucket", {}, {"Bucket": "graft"})
    stub.add_response("put_object", {}, {"Bucket": "graft", "Key": probe, "Body": b"graft"})
    stub.add_response("delete_object", {}, {"Bucket": "graft", "Key": probe})
    with stub:
        store.check(PREFIX, write=True)
        stub.assert_no_pending_responses()


@pytest.mark.parametrize(
    ("code", "status", "refusal"),
    [
        ("404", 404, True),  # head_bucket's word for no such bucket
        ("InvalidAccessKeyId", 403, True),
        ("SignatureDoesNotMatch", 403, True),
        ("InternalError", 500, False),
        ("SlowDown", 503, False),
    ],
)
def test_refusals_are_not_retried_and_outages_are(
    code: str, status: int, refusal: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRAFT_STORE_RETRY_SECONDS", "0")  # no waiting: the class is the point
    store, stub = stubbed()
    stub.add_client_error("head_bucket", code, code, status)
    with stub, pytest.raises(StoreError) as failed:
        store.check(PREFIX)
    assert isinstance(failed.value, StoreAccessError) is refusal
    assert store_exit_code(failed.value) == (EXIT_INVALID if refusal else EXIT_FAILURE)


def test_an_outage_is_waited_out_within_the_retry_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store answers 503 twice, then works: the call succeeds; a refusal is never retried."""
    monkeypatch.setenv("GRAFT_STORE_RETRY_SECONDS", "30")
    monkeypatch.setattr("graft.storage.store.time.sleep", lambda seconds: None)
    store, stub = stubbed()
    stub.add_client_error("head_bucket", "SlowDown", "Please reduce your request rate", 503)
    stub.add_client_error("head_bucket", "InternalError", "We encountered an internal error", 500)
    stub.add_response("head_bucket", {}, {"Bucket": "graft"})
    with stub:
        store.check(PREFIX)
        stub.assert_no_pending_responses()
    store, stub = stubbed()
    stub.add_client_error("head_bucket", "InvalidAccessKeyId", "no such key", 403)
    with stub, pytest.raises(StoreAccessError):
        store.check(PREFIX)  # one answer, no retry (a second call would find no stub)


def test_existence_is_asked_of_the_metadata_never_the_body() -> None:
    """A dataset object of many gigabytes is not downloaded into memory to learn it exists: only
    HEAD requests are stubbed, so a GET would fail the test."""
    store, stub = stubbed()
    uri = "s3://graft/datasets/huge.jsonl"
    stub.add_response(
        "head_object",
        {"ContentLength": 50 * 2**30},
        {"Bucket": "graft", "Key": "datasets/huge.jsonl"},
    )
    stub.add_client_error("head_object", "404", "Not Found", 404)
    with stub:
        assert store.exists(uri) is True
        assert store.exists(uri) is False
        stub.assert_no_pending_responses()
