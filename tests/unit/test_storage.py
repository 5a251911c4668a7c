"""S3 plumbing that needs no server: URIs, the key-escape rule, error classification, retry timing,
secret redaction, ETags, the cache index, the uploader's queue, what the mirror uploads, remote pruning rules."""

from __future__ import annotations

import hashlib
import os
import random
import re
import threading
import time

import pytest
from botocore import exceptions as bx

from lora_trainer.errors import StorageError, StorageUnavailableError
from lora_trainer.redaction import redact
from lora_trainer.storage.client import Kind, Retry, classify, describe
from lora_trainer.storage.download import CacheIndex, RemoteObject, Unit, composite_etag, plan_units
from lora_trainer.storage.mirror import tree_files
from lora_trainer.storage.remote_checkpoints import checkpoint_steps
from lora_trainer.storage.upload import Uploader
from lora_trainer.storage.uri import S3Uri, UnsafeKeyError, check_relative_key, safe_local_path


# -- URIs
@pytest.mark.parametrize(
    "uri, bucket, key",
    [
        ("s3://b/a/b", "b", "a/b"),
        ("s3://b/a/b/", "b", "a/b"),
        ("s3://b", "b", ""),
        ("s3://b/", "b", ""),
    ],
)
def test_uri_parse(uri, bucket, key):
    parsed = S3Uri.parse(uri)
    assert (parsed.bucket, parsed.key) == (bucket, key)
    assert S3Uri.parse(str(parsed)) == parsed


def test_uri_children_and_listing_prefix():
    run = S3Uri.parse("s3://loras/cats")
    assert str(run.child("checkpoints/state_step_4/")) == "s3://loras/cats/checkpoints/state_step_4"
    assert run.folder_prefix == "cats/"  # so s3://loras/cats never lists s3://loras/cats2
    assert run.relative("cats/logs/x") == "logs/x"
    assert S3Uri.parse("s3://loras").folder_prefix == ""
    with pytest.raises(ValueError):
        S3Uri.parse("/local/path")
    with pytest.raises(ValueError):
        S3Uri.parse("s3:///key")


# -- the key-escape rule
@pytest.mark.parametrize(
    "key",
    [
        "img.png",
        "a/b/c.png",
        "...",
        "a..b/c",
        "..a",
        "100%.png",
        "%41.png",
        "猫/写真.png",
        "a b/c d.txt",
    ],
)
def test_safe_keys(key, tmp_path):
    assert safe_local_path(tmp_path, key) == tmp_path / key


@pytest.mark.parametrize(
    "key, why",
    [
        ("../evil", "'..' path segment"),
        ("a/../../evil", "'..' path segment"),
        ("..", "'..' path segment"),
        ("./a", "'.' path segment"),
        ("/etc/passwd", "absolute path"),
        ("a//b", "empty path segment"),
        ("a\\..\\..\\evil", "backslash"),
        ("a/b\x00c", "control characters"),
        ("a/\nb", "control characters"),
        ("%2e%2e/evil", "decodes to '..'"),
        ("%2E%2E/evil", "decodes to '..'"),
        ("%252e%252e/evil", "decodes to '..'"),
        ("..%2fevil", "decodes to '../evil'"),
        ("..%5cevil", "'..%5cevil' decodes to"),
        ("\uff0e\uff0e/evil", "decodes to '..'"),  # fullwidth full stops: NFKC gives '..'
        ("\u2025/evil", "decodes to '..'"),  # two dot leader
        ("", "empty"),
        ("a/" + "x" * 256, "is 256 bytes long; a file name can have at most 255"),
        ("\u00e9" * 128 + "/a", "is 256 bytes long"),  # 128 characters, 256 bytes in UTF-8
    ],
)
def test_unsafe_keys_are_refused(key, why, tmp_path):
    with pytest.raises(UnsafeKeyError, match=re.escape(why)):
        safe_local_path(tmp_path, key)


def test_the_longest_file_name_is_allowed(tmp_path):
    assert safe_local_path(tmp_path, "a/" + "x" * 255).name == "x" * 255


def test_a_symlink_inside_the_cache_cannot_lead_outside(tmp_path):
    root, outside = tmp_path / "cache", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (root / "link").symlink_to(outside)
    check_relative_key("link/evil")  # the key itself is fine...
    with pytest.raises(UnsafeKeyError, match="outside the cache folder"):
        safe_local_path(root, "link/evil")  # ...but it resolves outside


# -- classification
def client_error(code: str, status: int) -> bx.ClientError:
    return bx.ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
    )


@pytest.mark.parametrize(
    "err, kind",
    [
        (client_error("SlowDown", 503), Kind.TRANSIENT),
        (client_error("InternalError", 500), Kind.TRANSIENT),
        (client_error("502", 502), Kind.TRANSIENT),
        (client_error("Throttling", 400), Kind.TRANSIENT),
        (client_error("RequestTimeout", 400), Kind.TRANSIENT),
        (client_error("TooManyRequests", 429), Kind.TRANSIENT),
        (client_error("InvalidAccessKeyId", 403), Kind.PERMANENT),
        (client_error("SignatureDoesNotMatch", 403), Kind.PERMANENT),
        (client_error("AccessDenied", 403), Kind.PERMANENT),
        (client_error("403", 403), Kind.PERMANENT),
        (client_error("NoSuchBucket", 404), Kind.PERMANENT),
        (client_error("NoSuchKey", 404), Kind.NOT_FOUND),
        (client_error("404", 404), Kind.NOT_FOUND),
        (bx.EndpointConnectionError(endpoint_url="http://x"), Kind.TRANSIENT),
        (bx.ConnectTimeoutError(endpoint_url="http://x"), Kind.TRANSIENT),
        (bx.ReadTimeoutError(endpoint_url="http://x"), Kind.TRANSIENT),
        (bx.ConnectionClosedError(endpoint_url="http://x"), Kind.TRANSIENT),
        (ConnectionResetError(104, "Connection reset by peer"), Kind.TRANSIENT),
        (bx.NoCredentialsError(), Kind.PERMANENT),
        (ValueError("a bug"), None),
    ],
)
def test_classify(err, kind):
    assert classify(err) is kind


def test_messages_name_the_problem_and_never_a_secret(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-v4lue")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "t0ken-v4lue")
    assert "rejected the credentials (InvalidAccessKeyId)" in describe(client_error("InvalidAccessKeyId", 403), "x")
    assert "the bucket does not exist" in describe(client_error("NoSuchBucket", 404), "x")
    leaky = RuntimeError("boom: secret=s3cr3t-v4lue token=t0ken-v4lue at http://user:pa55@host/x")
    text = describe(leaky, "upload")
    assert "s3cr3t" not in text and "t0ken" not in text and "pa55" not in text
    assert redact("key s3cr3t-v4lue") == "key ***"


# -- retry with a fake clock
class FakeTime:
    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def clock(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


def failing(errors, result="ok"):
    calls = []

    def op():
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return result

    return op, calls


def test_transient_errors_are_retried_with_capped_jittered_backoff():
    t = FakeTime()
    retry = Retry(seconds=300, base=0.5, cap=4, clock=t.clock, sleep=t.sleep, rng=random.Random(1))
    op, calls = failing([client_error("SlowDown", 503)] * 8)
    assert retry.call(op, "put x") == "ok"
    assert len(calls) == 9
    assert all(0 <= s <= min(4, 0.5 * 2**i) for i, s in enumerate(t.sleeps))
    assert len(set(t.sleeps)) == len(t.sleeps)  # jitter: no two waits alike


def test_an_outage_longer_than_the_deadline_ends_as_storage_unavailable():
    t = FakeTime()
    retry = Retry(seconds=60, cap=10, clock=t.clock, sleep=t.sleep)
    op, calls = failing([bx.EndpointConnectionError(endpoint_url="http://s3")] * 1000)
    with pytest.raises(StorageUnavailableError, match="put x: S3 still failing after 60 s of retries"):
        retry.call(op, "put x")
    assert t.now <= 60 and len(calls) > 5


def test_an_outage_shorter_than_the_deadline_is_waited_out():
    t = FakeTime()
    retry = Retry(seconds=300, cap=15, clock=t.clock, sleep=t.sleep)
    down_until = 60.0

    def op():
        if t.now < down_until:
            raise bx.EndpointConnectionError(endpoint_url="http://s3")
        return "ok"

    assert retry.call(op, "put x") == "ok"
    assert 60 <= t.now < 60 + 15


def test_permanent_errors_are_not_retried():
    t = FakeTime()
    op, calls = failing([client_error("InvalidAccessKeyId", 403)])
    with pytest.raises(StorageError, match="rejected the credentials"):
        Retry(clock=t.clock, sleep=t.sleep).call(op, "s3://b")
    assert len(calls) == 1 and t.sleeps == []


def test_not_found_goes_to_the_callers_handler_and_bugs_pass_through():
    op, _ = failing([client_error("404", 404)])
    assert Retry().call(op, "head", missing=lambda err: "absent") == "absent"
    op, _ = failing([KeyError("bug")])
    with pytest.raises(KeyError):
        Retry().call(op, "head")


# -- ETags and the cache index
def test_composite_etag_is_what_s3_gives_a_multipart_upload():
    data = bytes(range(256)) * 1000  # 256 000 bytes in parts of 100 000
    parts = [hashlib.md5(data[i : i + 100_000]).digest() for i in range(0, len(data), 100_000)]
    assert composite_etag(parts) == hashlib.md5(b"".join(parts)).hexdigest() + "-3"


def test_multipart_objects_download_part_by_part():
    obj = RemoteObject("m/big", "big", 250, "e-3")
    assert plan_units(obj, 100) == [Unit(obj, 1, 0, 100), Unit(obj, 2, 100, 100), Unit(obj, 3, 200, 50)]
    assert plan_units(obj, None) == [Unit(obj, 0, 0, 250)]
    empty = RemoteObject("m/empty", "empty", 0, "d41d8cd98f00b204e9800998ecf8427e")
    assert plan_units(empty, None) == [Unit(empty, 0, 0, 0)]


def test_cache_index_survives_a_torn_line_and_notices_local_changes(tmp_path):
    index_path, local = tmp_path / "index.jsonl", tmp_path / "a.png"
    local.write_bytes(b"12345")
    obj = RemoteObject("data/a.png", "a.png", 5, "etag1")
    index = CacheIndex(index_path)
    assert not index.fresh(obj, local)
    index.add(obj, local)
    index.close()
    with index_path.open("a") as f:
        f.write('{"key": "data/b.p')  # a crash mid-line
    index = CacheIndex(index_path)
    assert index.fresh(obj, local)
    assert not index.fresh(RemoteObject("data/a.png", "a.png", 5, "etag2"), local)  # changed on S3
    local.write_bytes(b"54321")
    os.utime(local, ns=(time.time_ns(), time.time_ns()))
    assert not index.fresh(obj, local)  # changed locally


# -- the uploader
def test_uploader_runs_jobs_in_order_and_blocks_only_when_the_queue_is_full():
    gate, done = threading.Event(), []
    uploader = Uploader(queue_size=2).start()
    uploader.submit(lambda: (gate.wait(5), done.append(1)))
    time.sleep(0.1)  # job 1 is running, the queue is empty
    assert uploader.submit(lambda: done.append(2), wait=False)
    assert uploader.submit(lambda: done.append(3), wait=False)
    assert not uploader.submit(lambda: done.append(4), wait=False)  # full: training would wait here
    assert not uploader.drain(timeout=0.2)
    gate.set()
    assert uploader.drain(timeout=5)
    assert done == [1, 2, 3]
    uploader.close()


def test_a_submit_blocked_by_a_full_queue_gives_up_once_the_run_is_stopping():
    gate, stopping = threading.Event(), threading.Event()
    uploader = Uploader(queue_size=1, stopping=stopping.is_set).start()
    uploader.submit(lambda: gate.wait(10))
    time.sleep(0.1)
    uploader.submit(lambda: None)  # the queue is full now, as during an S3 outage
    result: list[bool] = []
    blocked = threading.Thread(target=lambda: result.append(uploader.submit(lambda: None)))
    blocked.start()
    blocked.join(0.5)
    assert blocked.is_alive()  # backpressure: training waits for room
    stopping.set()  # SIGTERM
    blocked.join(2)
    assert not blocked.is_alive() and result == [False]
    gate.set()
    uploader.close()


def test_an_upload_failure_reaches_the_training_thread():
    uploader = Uploader(queue_size=2).start()
    uploader.submit(lambda: (_ for _ in ()).throw(StorageError("s3://b: rejected")))
    uploader.drain(timeout=5)
    with pytest.raises(StorageError, match="rejected"):
        uploader.check()
    with pytest.raises(StorageError):
        uploader.submit(lambda: None)
    uploader.close()


# -- what goes where
def test_tree_sync_leaves_step_checkpoints_hidden_files_and_the_finish_marker_out(tmp_path):
    for rel in [
        "config_backup.yaml",
        "EXPERIMENT.md",
        "logs/events.out.tfevents.1.host.1.0",
        "checkpoints/pytorch_lora_weights_final.safetensors",
        "pytorch_lora_weights.safetensors",
        "checkpoints/pytorch_lora_weights_step_2.safetensors",
        "checkpoints/state_step_2/manifest.json",
        ".lora-upload/step_2/checkpoints/state_step_2/state.json",
        "checkpoints/.x.safetensors.tmp",
        "me.kohya.safetensors",
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    assert tree_files(tmp_path) == [
        "EXPERIMENT.md",
        "checkpoints/pytorch_lora_weights_final.safetensors",
        "config_backup.yaml",
        "logs/events.out.tfevents.1.host.1.0",
        "me.kohya.safetensors",
    ]


def test_checkpoint_steps_on_s3_tell_complete_from_present():
    keys = [
        "state_step_2/manifest.json",
        "state_step_2/state.json",
        "pytorch_lora_weights_step_2.safetensors",
        "state_step_4/state.json",
        "pytorch_lora_weights_step_4.safetensors",
        "pytorch_lora_weights_step_6.safetensors",
        "pytorch_lora_weights_final.safetensors",
        "state_step_8/manifest.json.tmp",
    ]
    assert checkpoint_steps(keys) == ({2}, {2, 4, 6, 8})
