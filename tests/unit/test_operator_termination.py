"""The operator's reading of a trainer's termination message: what the contract allows passes, anything else
is dropped and named (operator/lora_operator/termination.py)."""

from __future__ import annotations

import json

import pytest

from lora_operator.termination import MAX_ARTIFACTS, MAX_ERROR, read_message, under

OUT = "s3://loras/cats"
SHA = "9f" * 32
GOOD = {
    "status": "succeeded",
    "exitCode": 0,
    "step": 100,
    "totalSteps": 100,
    "loss": 0.0931,
    "rank": 0,
    "worldSize": 2,
    "artifacts": [
        {"uri": f"{OUT}/pytorch_lora_weights.safetensors", "format": "diffusers", "sha256": SHA, "step": 100}
    ],
    "lastCheckpoint": {"step": 90, "uri": f"{OUT}/checkpoints/state_step_90"},
}


def read(doc: dict, output_uri: str | None = OUT):
    return read_message("trainer log line\n" + json.dumps(doc), output_uri)


def test_a_message_of_the_contract_passes_whole():
    reading = read(GOOD)
    assert reading.summary == GOOD and reading.problems == []
    failed = {"status": "failed", "exitCode": 3, "error": "bad image", "reason": "DatasetInvalid", "permanent": True}
    assert read(failed).summary == failed


def test_null_fields_are_absent_not_problems():
    reading = read({"status": "failed", "exitCode": 1, "loss": None, "totalSteps": None})
    assert reading.summary == {"status": "failed", "exitCode": 1} and reading.problems == []


@pytest.mark.parametrize(
    "text",
    ["", "not json", '{"no": "status"}', "[1, 2]", '{"status": "succeeded"'],
)
def test_no_summary_in_the_message(text):
    assert read_message(text).summary is None


@pytest.mark.parametrize(
    "key, value, problem",
    [
        ("loss", "NaN", 'loss: "NaN" is not a finite number'),
        ("step", -1, "step: -1 is not a whole number"),
        ("step", 2**64, "is not a whole number from 0 to"),
        ("step", 1.5, "step: 1.5 is not a whole number"),
        ("step", True, "step: true is not a whole number"),
        ("exitCode", "0", 'exitCode: "0" is not a whole number'),
        ("permanent", "yes", 'permanent: "yes" is not true or false'),
        ("reason", "Not A Reason", 'reason: "Not A Reason" is not a CamelCase reason'),
        ("reason", "A" * 65, "is not a CamelCase reason"),
        ("error", {"nested": {"deep": 1}}, 'error: {"nested": {"deep": 1}} is not text'),
        ("artifacts", 5, "artifacts: 5 is not a list"),
        ("lastCheckpoint", [1], "lastCheckpoint: [1] is not an object"),
        ("surprise", 1, "surprise: not a field of the termination message"),
    ],
)
def test_a_bad_field_is_dropped_and_named_the_rest_kept(key, value, problem):
    reading = read({**GOOD, key: value})
    assert key not in reading.summary
    assert reading.summary["step" if key != "step" else "loss"] is not None  # the rest is kept
    assert len(reading.problems) == 1 and problem in reading.problems[0], reading.problems


def test_the_python_json_extensions_never_pass():
    for literal in ("NaN", "Infinity", "-Infinity"):
        reading = read_message('{"status": "failed", "loss": ' + literal + ', "step": 3}')
        assert reading.summary == {"status": "failed", "step": 3}
        assert reading.problems == [f'loss: "{literal}" is not a finite number']


def test_uris_outside_the_output_are_dropped():
    artifacts = [
        {"uri": "s3://loras/other-job/pytorch_lora_weights.safetensors"},
        {"uri": f"{OUT}/../other-job/x.safetensors"},
        {"uri": "s3://loras/cats-2/x.safetensors"},
        {"uri": f"{OUT}/ok.safetensors", "sha256": "XYZ"},
        {"uri": f"{OUT}/x\n.safetensors"},
        {"format": "diffusers"},
    ]
    reading = read({**GOOD, "artifacts": artifacts, "lastCheckpoint": {"step": 3, "uri": "s3://elsewhere/ckpt"}})
    assert reading.summary["artifacts"] == [{"uri": f"{OUT}/ok.safetensors"}]
    assert "lastCheckpoint" not in reading.summary
    text = "\n".join(reading.problems)
    for part in ("artifacts[0].uri", "artifacts[1].uri", "artifacts[2].uri", "artifacts[3].sha256",
                 "artifacts[4].uri", "artifacts[5]: dropped, it has no valid uri", "lastCheckpoint.uri"):  # fmt: skip
        assert part in text, text
    assert "not under spec.output.uri s3://loras/cats" in text


def test_sizes_are_bounded():
    many = [{"uri": f"{OUT}/w{i}.safetensors"} for i in range(MAX_ARTIFACTS + 10)]
    reading = read({**GOOD, "artifacts": many, "error": "e" * (MAX_ERROR * 3)})
    assert len(reading.summary["artifacts"]) == MAX_ARTIFACTS
    assert len(reading.summary["error"]) == MAX_ERROR + len(" [...]")
    assert any("more than 64" in p for p in reading.problems)
    long_key = read({**GOOD, "k" * 10_000: 1})
    assert all(len(p) < 200 for p in long_key.problems)


def test_a_deeply_nested_message_is_no_crash():
    deep = '{"status": "failed", "error": ' + "[" * 100_000 + "]" * 100_000 + "}"
    assert read_message(deep).summary is None  # not parseable as a summary: ignored


def test_under():
    assert under(f"{OUT}/a", OUT) and under(f"{OUT}/a", OUT + "/")
    assert not under(OUT, OUT) and not under("s3://loras/catsx/a", OUT) and not under(f"{OUT}/a/../../b", OUT)
    assert under("anything", None)
