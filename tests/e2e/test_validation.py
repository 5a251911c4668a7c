"""Bad manifests are refused by `kubectl apply` with a message that names the field; a started job's
definition is fixed while spec.suspend stays mutable."""

import copy

import pytest
import yaml

from tests.e2e import operator_env as env

pytestmark = pytest.mark.e2e


def manifest(name="bad", **spec):
    return env.sd_manifest(name, "bucket", **spec)


def drop(path):
    body = manifest()
    node = body
    for part in path[:-1]:
        node = node[part]
    del node[path[-1]]
    return body


def with_metadata(**meta):
    body = manifest()
    body["metadata"].update(meta)
    return body


BAD = [
    # (id, manifest, words the refusal must contain)
    ("missing-base-model", drop(("spec", "baseModel")), ["spec.baseModel", "Required"]),
    ("missing-output", drop(("spec", "output")), ["spec.output", "Required"]),
    ("missing-dataset-uri", manifest(dataset={"uri": None, "resolution": 32}), ["spec.dataset.uri", "Required"]),
    ("dataset-not-s3", manifest(dataset={"uri": "/data/cats"}), ["spec.dataset.uri", "s3://"]),
    ("output-bucket-uppercase", manifest(output={"uri": "s3://My_Bucket/x"}), ["spec.output.uri"]),
    ("output-dotdot", manifest(output={"uri": "s3://bucket/a/../b"}), ["spec.output.uri", ".."]),
    ("unknown-task", manifest(task="image-to-video"), ["spec.task", "text-to-image", "text-generation"]),
    ("rank-zero", manifest(training={"rank": 0}), ["spec.training.rank", "greater than or equal to 1"]),
    ("negative-learning-rate", manifest(training={"learningRate": -0.001}), ["spec.training.learningRate"]),
    ("dropout-above-one", manifest(training={"dropout": 1.5}), ["spec.training.dropout"]),
    ("unknown-scheduler", manifest(training={"lrScheduler": "warp"}), ["spec.training.lrScheduler", "cosine"]),
    ("unknown-precision", manifest(training={"precision": "fp8"}), ["spec.training.precision"]),
    # an unquoted `precision: no` reaches the API server as false (docs/operator.md says to quote it)
    (
        "precision-bare-no",
        manifest(training={"precision": False}),
        ["spec.training.precision", "must be of type string"],
    ),
    ("steps-as-text", manifest(training={"steps": "many"}), ["spec.training.steps", "integer"]),
    (
        "warmup-beyond-steps",
        manifest(training={"steps": 10, "warmupSteps": 20}),
        ["spec.training.warmupSteps", "must not exceed spec.training.steps"],
    ),
    (
        "text-encoder-for-llm",
        env.llm_manifest("bad", "bucket", training={"trainTextEncoder": True}),
        ["spec.training.trainTextEncoder", "text-to-image only"],
    ),
    (
        "fp16-without-gpu",
        manifest(training={"precision": "fp16"}, resources={"gpus": 0}),
        ["spec.training.precision", "needs a GPU"],
    ),
    ("memory-not-a-quantity", manifest(resources={"memory": "lots"}), ["spec.resources.memory"]),
    ("cpu-negative", manifest(resources={"cpu": -2}), ["spec.resources.cpu", "must not be negative"]),
    ("too-many-gpus", manifest(resources={"gpus": 1000}), ["spec.resources.gpus", "less than or equal to 64"]),
    ("zero-nodes", manifest(resources={"nodes": 0}), ["spec.resources.nodes", "greater than or equal to 1"]),
    ("too-many-nodes", manifest(resources={"nodes": 65}), ["spec.resources.nodes", "less than or equal to 64"]),
    (
        "processes-per-node-with-gpus",
        manifest(resources={"gpus": 2, "processesPerNode": 2}),
        ["spec.resources.processesPerNode", "CPU training (gpus: 0)"],
    ),
    (
        # gpus defaults to 1: processesPerNode alone is refused as well
        "processes-per-node-with-default-gpus",
        manifest(resources={"gpus": None, "processesPerNode": 2}),
        ["spec.resources.processesPerNode", "one process per GPU"],
    ),
    (
        "toleration-exists-with-value",
        manifest(resources={"tolerations": [{"key": "gpu", "operator": "Exists", "value": "x"}]}),
        ["spec.resources.tolerations[0]", "Exists"],
    ),
    ("unknown-format", manifest(output={"formats": ["ckpt"]}), ["spec.output.formats[0]", "diffusers"]),
    (
        "same-input-and-output",
        manifest(dataset={"uri": "s3://bucket/x"}, output={"uri": "s3://bucket/x"}),
        ["spec.output.uri", "must differ from spec.dataset.uri"],
    ),
    (
        "delete-a-whole-bucket",
        manifest(output={"uri": "s3://bucket"}, cleanupPolicy="DeleteOutputs"),
        ["spec.cleanupPolicy", "prefix below the bucket"],
    ),
    ("unknown-cleanup-policy", manifest(cleanupPolicy="Shred"), ["spec.cleanupPolicy", "Retain"]),
    ("endpoint-not-a-url", manifest(s3={"endpoint": "minio:9000"}), ["spec.s3.endpoint"]),
    ("negative-backoff", manifest(backoffLimit=-1), ["spec.backoffLimit"]),
    ("deadline-zero", manifest(activeDeadlineSeconds=0), ["spec.activeDeadlineSeconds"]),
    ("unknown-field", manifest(training={"learning_rate": 1e-4}), ['unknown field "spec.training.learning_rate"']),
    ("a-name-of-64-characters-" + "x" * 40, manifest(), ["metadata.name must have at most 63 characters"]),
    (
        "bucketing-min-above-max",
        manifest(dataset={"uri": "s3://bucket/data", "bucketing": {"minResolution": 1024, "maxResolution": 256}}),
        ["spec.dataset.bucketing.minResolution"],
    ),
]


@pytest.mark.parametrize("name,body,words", BAD, ids=[b[0] for b in BAD])
def test_bad_manifest_is_refused_naming_the_field(kube_cluster, lora_crd, namespace, name, body, words):
    body = copy.deepcopy(body)
    body["metadata"]["name"] = name
    out = kube_cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(body), check=False)
    assert out.returncode != 0, f"{name} was accepted:\n{out.stdout}"
    for word in words:
        assert word in out.stderr, f"{word!r} not in the refusal:\n{out.stderr}"
    got = kube_cluster.kubectl("get", "ltj", name, "-n", namespace, check=False)
    assert got.returncode != 0  # nothing was stored


def test_a_good_manifest_gets_its_defaults(kube_cluster, lora_crd, namespace):
    body = manifest("good")
    del body["spec"]["training"]
    del body["spec"]["output"]["saveSteps"]
    kube_cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=yaml.safe_dump(body))
    out = kube_cluster.kubectl(
        "apply", "--dry-run=server", "-n", namespace, "-o", "yaml", "-f", "-", input=yaml.safe_dump(body)
    )
    spec = yaml.safe_load(out.stdout)["spec"]
    assert spec["resources"]["nodes"] == 1 and "processesPerNode" not in spec["resources"]  # one pod, one process
    assert spec["training"] == {
        "rank": 16,
        "batchSize": 1,
        "gradientAccumulationSteps": 1,
        "epochs": 1,
        "learningRate": 0.0001,
        "lrScheduler": "constant",
        "precision": "no",
        "baseQuantization": "none",
        "distributedStrategy": "ddp",
        "seed": 42,
    }
    assert spec["backoffLimit"] == 3 and spec["suspend"] is False and spec["cleanupPolicy"] == "Retain"
    assert spec["output"]["saveSteps"] == 500


def test_short_names_and_category(kube_cluster, lora_crd, namespace):
    for name in ("ltj", "lorajob", "loratrainingjobs", "lora"):
        assert kube_cluster.kubectl("get", name, "-n", namespace).returncode == 0


def test_started_job_is_immutable_but_suspend_is_not(jobs):
    body = env.sd_manifest("frozen", jobs.bucket, suspend=True)  # the operator creates a suspended Job
    jobs.apply(body)
    jobs.wait(
        body["metadata"]["name"],
        lambda s: s.get("startTime") and s.get("phase") == "Suspended",
        60,
        "the job to start suspended",
    )
    changed = copy.deepcopy(body)
    changed["spec"]["training"]["rank"] = 8
    out = jobs.apply(changed, check=False)
    assert out.returncode != 0 and "spec.training cannot change once the job has started" in out.stderr
    moved = copy.deepcopy(body)
    moved["spec"]["output"]["uri"] = f"s3://{jobs.bucket}/elsewhere"
    out = jobs.apply(moved, check=False)
    assert out.returncode != 0 and "spec.output cannot change once the job has started" in out.stderr
    # suspend and cleanupPolicy stay mutable (here: stay suspended, change only the policy)
    relabelled = copy.deepcopy(body)
    relabelled["spec"]["cleanupPolicy"] = "DeleteOutputs"
    assert jobs.apply(relabelled).returncode == 0
    assert jobs.kubectl("patch", "ltj", "frozen", "--type=merge", "-p", '{"spec":{"suspend":false}}').returncode == 0
    jobs.kubectl("delete", "ltj", "frozen", "--wait=false")


@pytest.mark.parametrize("example", sorted(p.name for p in (env.REPO / "examples").glob("loratrainingjob-*.yaml")))
def test_examples_are_accepted(kube_cluster, lora_crd, namespace, example):
    out = kube_cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", env.REPO / "examples" / example)
    assert "created (server dry run)" in out.stdout
