"""The CRD against the trainer: every spec field maps onto a trainer key and back; enums, minimums and
defaults mirror lora_trainer.config.schema; the chart ships the identical file."""

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from lora_trainer.config.manifest import CLUSTER_ONLY_FIELDS, SPEC_TO_CONFIG
from lora_trainer.config.schema import TrainConfig, config_fields

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "loratrainingjobs.yaml"
CHART_CRD_PATH = REPO / "charts" / "lora-operator" / "crds" / "loratrainingjobs.yaml"
FIELDS = {f.name: f for f in config_fields()}
HINTS = typing.get_type_hints(TrainConfig)


@pytest.fixture(scope="module")
def crd():
    return yaml.safe_load(CRD_PATH.read_text())


@pytest.fixture(scope="module")
def version(crd):
    (v,) = crd["spec"]["versions"]
    return v


@pytest.fixture(scope="module")
def spec_schema(version):
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]


def leaf_paths(schema, prefix=()):
    """Paths of the leaves of an object schema (objects with properties are walked into)."""
    out = []
    for key, sub in (schema.get("properties") or {}).items():
        path = (*prefix, key)
        if sub.get("type") == "object" and sub.get("properties"):
            out += leaf_paths(sub, path)
        else:
            out.append(path)
    return out


def node(spec_schema, path):
    schema = spec_schema
    for part in path:
        schema = schema["properties"][part]
    return schema


def test_identity(crd, version):
    assert crd["metadata"]["name"] == "loratrainingjobs.lora-operator.io"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["singular"]) == (
        "LoRATrainingJob",
        "loratrainingjobs",
        "loratrainingjob",
    )
    assert set(names["shortNames"]) == {"ltj", "lorajob"}
    assert crd["spec"]["scope"] == "Namespaced" and version["name"] == "v1alpha1"
    assert version["subresources"] == {"status": {}}


def test_printer_columns(version):
    columns = {c["name"].upper(): c for c in version["additionalPrinterColumns"]}
    for name in ("PHASE", "STEP", "LOSS", "ETA", "AGE"):
        assert name in columns and columns[name].get("priority", 0) == 0
    assert columns["PHASE"]["jsonPath"] == ".status.phase"
    assert columns["STEP"]["jsonPath"] == ".status.progress.step"
    assert columns["LOSS"]["jsonPath"] == ".status.progress.loss"
    assert columns["ETA"]["jsonPath"] == ".status.progress.eta"
    assert columns["AGE"]["jsonPath"] == ".metadata.creationTimestamp"


def test_every_mapped_field_exists_in_the_crd(spec_schema):
    crd_paths = set(leaf_paths(spec_schema))
    missing = [".".join(p) for p, _ in SPEC_TO_CONFIG if p not in crd_paths]
    assert not missing, f"SPEC_TO_CONFIG paths missing from the CRD: {missing}"


def test_every_crd_field_is_mapped_or_cluster_only(spec_schema):
    mapped = {p for p, _ in SPEC_TO_CONFIG}
    stray = [".".join(p) for p in leaf_paths(spec_schema) if p not in mapped and p[0] not in CLUSTER_ONLY_FIELDS]
    assert not stray, f"CRD fields the trainer does not know (add them to SPEC_TO_CONFIG): {stray}"
    assert set(spec_schema["properties"]) - {p[0] for p in mapped} == set(CLUSTER_ONLY_FIELDS)


def _trainer_type(name):
    hint = HINTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union or type(hint).__name__ == "UnionType":
        hint = args[0]
    if typing.get_origin(hint) is list:
        return "array"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}[hint]


@pytest.mark.parametrize("path,key", SPEC_TO_CONFIG, ids=[".".join(p) for p, _ in SPEC_TO_CONFIG])
def test_types_enums_and_ranges_mirror_the_trainer(spec_schema, path, key):
    schema = node(spec_schema, path)
    meta = FIELDS[key].metadata
    assert schema["type"] == _trainer_type(key), f"{'.'.join(path)}: CRD type vs trainer type of {key}"
    values = schema.get("items", {}).get("enum") if schema["type"] == "array" else schema.get("enum")
    if meta["choices"]:
        assert values is not None and set(values) == set(meta["choices"]), f"{'.'.join(path)} enum"
    else:
        assert values is None
    if meta["min"] is not None:
        assert schema.get("minimum") == meta["min"], f"{'.'.join(path)} minimum"
        assert bool(schema.get("exclusiveMinimum")) == bool(meta["min_exclusive"]), f"{'.'.join(path)} exclusive"
    if meta["max"] is not None:
        assert schema.get("maximum") == meta["max"], f"{'.'.join(path)} maximum"


@pytest.mark.parametrize("path,key", SPEC_TO_CONFIG, ids=[".".join(p) for p, _ in SPEC_TO_CONFIG])
def test_crd_defaults_equal_the_trainer_defaults(spec_schema, path, key):
    schema = node(spec_schema, path)
    if "default" not in schema:
        return
    f = FIELDS[key]
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    assert schema["default"] == default, f"{'.'.join(path)}: CRD default {schema['default']!r} vs trainer {default!r}"


def test_uris_must_be_s3(spec_schema):
    import re

    for path in (("dataset", "uri"), ("output", "uri")):
        pattern = re.compile(node(spec_schema, path)["pattern"])
        assert pattern.match("s3://my-bucket/some/prefix") and pattern.match("s3://bucket")
        for bad in ("/local/path", "s3://", "s3://Upper/x", "https://bucket/x", "s3://a/x y"):
            assert not pattern.match(bad), (path, bad)


def test_quantity_patterns(spec_schema):
    import re

    cpu = re.compile(node(spec_schema, ("resources", "cpu"))["pattern"])
    memory = re.compile(node(spec_schema, ("resources", "memory"))["pattern"])
    assert all(cpu.match(v) for v in ("4", "500m", "0.5", "1.5"))
    assert not any(cpu.match(v) for v in ("4 cores", "1Gi", "-1", ""))
    assert all(memory.match(v) for v in ("32Gi", "512Mi", "1G", "1e9", "1000"))
    assert not any(memory.match(v) for v in ("32GB", "lots", "-1Gi", ""))


def test_only_suspend_and_cleanup_policy_may_change_after_start(version, spec_schema):
    rules = version["schema"]["openAPIV3Schema"]["x-kubernetes-validations"]
    guarded = {r["fieldPath"].removeprefix(".spec.") for r in rules if "oldSelf" in r["rule"]}
    assert guarded == set(spec_schema["properties"]) - {"suspend", "cleanupPolicy"}
    for rule in (r for r in rules if "oldSelf" in r["rule"]):
        assert rule["rule"].startswith("!has(oldSelf.status) || !has(oldSelf.status.startTime) || ")
        assert rule["message"].startswith(f"spec.{rule['fieldPath'].removeprefix('.spec.')} cannot change")


def test_a_name_that_cannot_label_the_children_is_refused(version):
    rules = version["schema"]["openAPIV3Schema"]["x-kubernetes-validations"]
    assert {
        "rule": "size(self.metadata.name) <= 63",
        "message": next(r["message"] for r in rules if "metadata.name" in r["rule"]),
    } in rules


def test_status_schema_covers_what_the_operator_writes(version):
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    for key in (
        "phase",
        "conditions",
        "progress",
        "lastCheckpoint",
        "artifacts",
        "attempts",
        "startTime",
        "completionTime",
        "observedGeneration",
        "children",
        "reason",
        "message",
        "currentPod",
        "workers",
        "scheduling",
    ):
        assert key in status
    assert set(status["children"]["properties"]) == {"configMap", "job", "service"}
    worker = status["workers"]["items"]["properties"]
    assert set(worker) >= {"index", "pod", "node", "phase", "ready", "attempts", "reason", "message"}
    assert set(status["scheduling"]["properties"]) == {"releases", "retryAt", "message"}
    assert set(status["progress"]["properties"]) == {
        "step",
        "totalSteps",
        "epoch",
        "loss",
        "learningRate",
        "samplesPerSecond",
        "eta",
        "updatedAt",
    }
    from lora_operator.status import Phase

    assert set(status["phase"]["enum"]) == {p.value for p in Phase}


def test_chart_ships_the_identical_crd():
    assert CHART_CRD_PATH.read_bytes() == CRD_PATH.read_bytes()
