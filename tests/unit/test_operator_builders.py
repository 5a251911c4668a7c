"""The operator's pure builders: trainer ConfigMap, training Job, cleanup Job (no cluster)."""

import copy
from datetime import UTC

import pytest
import yaml

from lora_operator import builders
from lora_operator.names import OWNER_UID_ANNOTATION, Children, child_name
from lora_operator.settings import Settings
from lora_trainer.config import build_config

SETTINGS = Settings(
    trainer_image="registry.example/lora-operator/trainer:1.0",
    s3_endpoint="http://minio:9000",
    s3_region="eu-west-1",
    s3_credentials_secret="default-s3",
    termination_grace_seconds=120,
)


def ltj(**spec_overrides):
    spec = {
        "task": "text-to-image",
        "baseModel": "preset:tiny-sd",
        "dataset": {"uri": "s3://data/cats", "resolution": 32},
        "training": {"rank": 4, "steps": 20, "learningRate": 1e-3, "batchSize": 2},
        "output": {"uri": "s3://loras/cats", "saveSteps": 5},
        "resources": {"gpus": 1},
        "backoffLimit": 3,
        "suspend": False,
        "cleanupPolicy": "Retain",
    }
    spec.update(spec_overrides)
    return {
        "apiVersion": "lora-operator.io/v1alpha1",
        "kind": "LoRATrainingJob",
        "metadata": {
            "name": "cats",
            "namespace": "team-a",
            "uid": "uid-123",
            "generation": 1,
            "labels": {"team": "vision"},
        },
        "spec": spec,
    }


def trainer(job):
    return job["spec"]["template"]["spec"]["containers"][0]


def env_of(container):
    return {e["name"]: e for e in container["env"]}


# ---------------------------------------------------------------------------------------------
# names


@pytest.mark.parametrize(
    "owner,suffix,expected",
    [
        ("cats", "train", "cats-train"),
        ("a" * 57, "train", "a" * 57 + "-train"),
    ],
)
def test_child_names_are_plain_when_short(owner, suffix, expected):
    assert child_name(owner, suffix) == expected


def test_long_owner_names_are_truncated_with_a_stable_hash():
    owner = "x" * 200
    name = child_name(owner, "train")
    assert len(name) <= 63 and name.endswith("-train")
    assert name == child_name(owner, "train")
    assert child_name(owner + "y", "train") != name  # different owners never collide by truncation


def test_children_are_recorded_by_name():
    assert Children.of("cats").as_status() == {"configMap": "cats-config", "job": "cats-train"}


# ---------------------------------------------------------------------------------------------
# the trainer config


def test_config_map_holds_the_spec_mapped_onto_trainer_keys_and_validates():
    cm = builders.build_config_map(ltj(), SETTINGS)
    config = yaml.safe_load(cm["data"]["config.yaml"])
    assert config["task_type"] == "text-to-image"
    assert config["train_data_dir"] == "s3://data/cats"
    assert config["output_dir"] == "s3://loras/cats"
    assert config["lora_rank"] == 4 and config["max_train_steps"] == 20 and config["learning_rate"] == 1e-3
    assert config["resume"] == "latest"  # every retry continues from the newest checkpoint
    build_config(config)  # the trainer accepts it as is
    assert cm["metadata"]["name"] == "cats-config" and cm["metadata"]["namespace"] == "team-a"


def test_cluster_only_fields_never_reach_the_trainer():
    config = builders.trainer_config(ltj(image="x", s3={"endpoint": "http://s3"}, activeDeadlineSeconds=5), SETTINGS)
    for key in ("resources", "image", "s3", "backoffLimit", "suspend", "cleanupPolicy"):
        assert key not in config


@pytest.mark.parametrize("allow,expected", [(True, True), (False, None)])
def test_overwrite_only_until_the_first_trainer_reported(allow, expected):
    spec = ltj(output={"uri": "s3://loras/cats", "overwrite": True})["spec"]
    assert builders.trainer_config(spec, SETTINGS, allow_overwrite=allow).get("overwrite") is expected


def test_config_problem_reports_what_the_trainer_would_refuse():
    spec = ltj(training={"steps": 5, "warmupSteps": 9})["spec"]
    problem = builders.config_problem(spec, SETTINGS)
    assert "lr_warmup_steps" in problem and "max_train_steps" in problem
    assert builders.config_problem(ltj()["spec"], SETTINGS) is None


# ---------------------------------------------------------------------------------------------
# the training Job


def test_job_uses_the_job_controller_for_retries_deadlines_and_cleanup():
    job = builders.build_training_job(
        ltj(activeDeadlineSeconds=3600, ttlSecondsAfterFinished=60, backoffLimit=2), SETTINGS
    )
    spec = job["spec"]
    assert job["apiVersion"] == "batch/v1" and job["metadata"]["name"] == "cats-train"
    assert spec["backoffLimit"] == 2 and spec["activeDeadlineSeconds"] == 3600
    assert spec["ttlSecondsAfterFinished"] == 60 and spec["suspend"] is False
    assert spec["podReplacementPolicy"] == "Failed" and spec["completions"] == spec["parallelism"] == 1
    assert spec["template"]["spec"]["restartPolicy"] == "Never"


def test_pod_failure_policy_fails_at_once_on_invalid_input_and_ignores_disruptions():
    rules = builders.build_training_job(ltj(), SETTINGS)["spec"]["podFailurePolicy"]["rules"]
    fail, ignore = rules
    assert fail["action"] == "FailJob"
    assert fail["onExitCodes"] == {"containerName": "trainer", "operator": "In", "values": [2, 3, 4, 5, 6]}
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}


def test_permanent_exit_codes_match_the_trainer():
    from lora_trainer.errors import PERMANENT_EXIT_CODES

    rules = builders.pod_failure_policy()["rules"]
    assert set(rules[0]["onExitCodes"]["values"]) == {int(c) for c in PERMANENT_EXIT_CODES}


def test_children_are_owned_by_the_job_and_carry_its_labels():
    for child in (builders.build_training_job(ltj(), SETTINGS), builders.build_config_map(ltj(), SETTINGS)):
        (ref,) = child["metadata"]["ownerReferences"]
        assert ref == {
            "apiVersion": "lora-operator.io/v1alpha1",
            "kind": "LoRATrainingJob",
            "name": "cats",
            "uid": "uid-123",
            "controller": True,
            "blockOwnerDeletion": True,
        }
        assert child["metadata"]["labels"]["lora-operator.io/job-name"] == "cats"
        assert child["metadata"]["labels"]["team"] == "vision"
    template = builders.build_training_job(ltj(), SETTINGS)["spec"]["template"]
    assert template["metadata"]["labels"]["lora-operator.io/job-name"] == "cats"


@pytest.mark.parametrize(
    "resources,requests,limits",
    [
        (
            {"gpus": 2, "cpu": "8", "memory": "32Gi"},
            {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"},
            {"memory": "32Gi", "nvidia.com/gpu": "2"},
        ),
        ({"gpus": 0, "cpu": 2}, {"cpu": "2"}, None),
        ({}, {"nvidia.com/gpu": "1"}, {"nvidia.com/gpu": "1"}),  # one GPU unless told otherwise
    ],
)
def test_resources(resources, requests, limits):
    container = trainer(builders.build_training_job(ltj(resources=resources), SETTINGS))
    assert container["resources"].get("requests") == requests
    assert container["resources"].get("limits") == limits


def test_scheduling_fields_pass_through_and_gpu_taints_are_tolerated():
    resources = {
        "gpus": 1,
        "nodeSelector": {"gpu": "a100"},
        "priorityClassName": "training",
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
    }
    pod = builders.build_training_job(ltj(resources=resources), SETTINGS)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "a100"} and pod["priorityClassName"] == "training"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert resources["tolerations"][0] in pod["tolerations"]
    cpu_pod = builders.build_training_job(ltj(resources={"gpus": 0}), SETTINGS)["spec"]["template"]["spec"]
    assert "tolerations" not in cpu_pod


def test_trainer_env_follows_the_contract():
    env = env_of(trainer(builders.build_training_job(ltj(), SETTINGS)))
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["LORA_JOB_NAME"]["value"] == "cats"
    assert env["LORA_JOB_UID"]["value"] == "uid-123"  # the output prefix's owner (lora_trainer/ownership.py)
    assert env["LORA_JOB_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["LORA_CONFIG"]["value"] == "/etc/lora-operator/config.yaml"
    # S3: the operator's defaults when the spec sets none
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "default-s3", "key": "AWS_ACCESS_KEY_ID"}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "default-s3"
    assert env["AWS_SESSION_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio:9000" and env["AWS_REGION"]["value"] == "eu-west-1"


def test_spec_s3_overrides_the_defaults_and_no_secret_means_no_keys():
    spec_s3 = {"endpoint": "http://seaweed:8333", "region": "us-east-1", "credentialsSecret": "mine"}
    env = env_of(trainer(builders.build_training_job(ltj(s3=spec_s3), SETTINGS)))
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "mine"
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://seaweed:8333" and env["AWS_REGION"]["value"] == "us-east-1"
    bare = env_of(trainer(builders.build_training_job(ltj(), Settings())))
    assert not any(name.startswith("AWS_") for name in bare)  # IRSA / instance roles


def test_pod_is_hardened_and_reports_through_a_termination_message():
    job = builders.build_training_job(ltj(), SETTINGS)
    pod = job["spec"]["template"]["spec"]
    container = trainer(job)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert pod["automountServiceAccountToken"] is False
    assert pod["terminationGracePeriodSeconds"] == 120
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert container["image"] == "registry.example/lora-operator/trainer:1.0"
    assert container["command"] == ["lora-train"] and container["args"] == [
        "--config",
        "/etc/lora-operator/config.yaml",
    ]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/lora-operator"]["readOnly"] is True and "/scratch" in mounts
    assert {"name": "metrics", "containerPort": 9400, "protocol": "TCP"} in container["ports"]


def test_sigterm_checkpoint_fits_the_grace_period():
    config = builders.trainer_config(ltj()["spec"], SETTINGS)
    if "sigterm_grace_seconds" in config:
        assert config["sigterm_grace_seconds"] < SETTINGS.termination_grace_seconds


def test_spec_image_and_suspend_win():
    job = builders.build_training_job(ltj(image="example/lora-operator-trainer:dev", suspend=True), SETTINGS)
    assert trainer(job)["image"] == "example/lora-operator-trainer:dev"
    assert job["spec"]["suspend"] is True


def test_builders_do_not_modify_their_input():
    body = ltj()
    before = copy.deepcopy(body)
    builders.build_training_job(body, SETTINGS)
    builders.build_config_map(body, SETTINGS)
    builders.build_cleanup_job(body, SETTINGS)
    assert body == before


def test_cleanup_job_deletes_the_output_prefix_with_the_jobs_credentials():
    job = builders.build_cleanup_job(ltj(), SETTINGS)
    container = job["spec"]["template"]["spec"]["containers"][0]
    # only what this job owns (lora_trainer/cleanup.py): the owner is the job's uid, as its trainers claimed it
    assert container["command"] == ["python", "-m", "lora_trainer.cleanup", "s3://loras/cats", "job:uid-123"]
    assert "ownerReferences" not in job["metadata"]  # it outlives the job it cleans up after
    assert OWNER_UID_ANNOTATION == "lora-operator.io/owner-uid"  # what reconcile.delete_outputs reads back
    assert job["metadata"]["annotations"][OWNER_UID_ANNOTATION] == "uid-123"
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    names = {e["name"] for e in container["env"]}
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"} <= names


def test_events_name_the_job_they_are_about():
    from datetime import datetime

    from lora_operator.events import Transition, build_event

    event = build_event(
        ltj(),
        Transition("Warning", "OOMKilled", "pod x ran out of memory"),
        datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        "operator-0",
    )
    assert event["involvedObject"] == {
        "apiVersion": "lora-operator.io/v1alpha1",
        "kind": "LoRATrainingJob",
        "name": "cats",
        "namespace": "team-a",
        "uid": "uid-123",
    }
    assert (event["type"], event["reason"], event["message"]) == ("Warning", "OOMKilled", "pod x ran out of memory")
    assert event["metadata"] == {"generateName": "cats.", "namespace": "team-a"}
    assert event["firstTimestamp"] == event["lastTimestamp"] == "2026-01-02T03:04:05Z"


# ---------------------------------------------------------------------------------------------
# shared memory and distributed training (several processes, several nodes)


def pod_spec(job):
    return job["spec"]["template"]["spec"]


@pytest.mark.parametrize(
    "memory,size",
    [
        ("32Gi", "16384Mi"),  # half of the memory request: the other half stays the trainer's
        ("1G", "476Mi"),
        ("1e9", "476Mi"),
        ("3000Mi", "1500Mi"),
        (8589934592, "4096Mi"),
        (None, None),  # no request: the kubelet sizes it to the pod's memory
    ],
)
def test_trainer_pods_get_shared_memory_sized_from_the_memory_request(memory, size):
    resources = {"gpus": 1} if memory is None else {"gpus": 1, "memory": memory}
    job = builders.build_training_job(ltj(resources=resources), SETTINGS)
    volumes = {v["name"]: v for v in pod_spec(job)["volumes"]}
    assert volumes["shm"]["emptyDir"].get("medium") == "Memory"
    assert volumes["shm"]["emptyDir"].get("sizeLimit") == size
    assert {"name": "shm", "mountPath": "/dev/shm"} in trainer(job)["volumeMounts"]


@pytest.mark.parametrize(
    "value,expected",
    [("32Gi", 32 * 2**30), ("512Mi", 512 * 2**20), ("1G", 10**9), ("1e9", 10**9), ("1000", 1000), ("0.5Gi", 2**29)],
)
def test_memory_quantities(value, expected):
    assert builders.quantity_bytes(value) == expected


# (resources, LORA_NPROC_PER_NODE): one process per GPU; on CPU processesPerNode, else 1
NPROC_CASES = [
    ({"gpus": 1}, "1"),
    ({"gpus": 4}, "4"),
    ({"gpus": 0}, "1"),
    ({"gpus": 0, "processesPerNode": 2}, "2"),
    ({"gpus": 2, "nodes": 3}, "2"),
    ({"gpus": 0, "nodes": 2, "processesPerNode": 2}, "2"),
    ({}, "1"),
]


@pytest.mark.parametrize("resources,nproc", NPROC_CASES)
def test_processes_per_node(resources, nproc):
    env = env_of(trainer(builders.build_training_job(ltj(resources=resources), SETTINGS)))
    assert env["LORA_NPROC_PER_NODE"]["value"] == nproc


def test_a_single_node_job_stays_one_pod_without_group_settings():
    job = builders.build_training_job(ltj(resources={"gpus": 2}), SETTINGS)
    spec = job["spec"]
    assert (spec["completions"], spec["parallelism"], spec["backoffLimit"]) == (1, 1, 3)
    assert not {"completionMode", "backoffLimitPerIndex", "maxFailedIndexes"} & set(spec)
    assert "subdomain" not in pod_spec(job)
    env = env_of(trainer(job))
    assert not {"LORA_NNODES", "LORA_NODE_RANK", "LORA_RDZV_ENDPOINT", "LORA_RDZV_ID", "LORA_MAX_RESTARTS"} & set(env)
    assert [p["name"] for p in trainer(job)["ports"]] == ["metrics"]
    assert Children.of("cats", 1).service is None


def test_a_multi_node_job_is_an_indexed_job_with_per_worker_retries():
    job = builders.build_training_job(ltj(resources={"gpus": 2, "nodes": 4}, backoffLimit=2), SETTINGS)
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 4
    assert spec["backoffLimitPerIndex"] == 2 and spec["maxFailedIndexes"] == 0
    assert "backoffLimit" not in spec  # the API defaults it; each worker index has its own budget
    assert spec["podReplacementPolicy"] == "Failed"
    assert spec["podFailurePolicy"] == builders.pod_failure_policy()  # permanent codes fail the whole group
    assert pod_spec(job)["subdomain"] == "cats-workers"
    assert {"name": "rendezvous", "containerPort": 29400, "protocol": "TCP"} in trainer(job)["ports"]
    limits = trainer(job)["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "2"  # per pod: each node brings its own GPUs


def test_multi_node_trainer_env_follows_the_contract():
    env = env_of(trainer(builders.build_training_job(ltj(resources={"gpus": 8, "nodes": 2}), SETTINGS)))
    assert env["LORA_NNODES"]["value"] == "2" and env["LORA_NPROC_PER_NODE"]["value"] == "8"
    assert env["LORA_NODE_RANK"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
    }
    assert env["LORA_RDZV_ENDPOINT"]["value"] == "cats-train-0.cats-workers.team-a.svc.cluster.local:29400"
    assert env["LORA_RDZV_ID"]["value"] == "uid-123"
    assert 1 <= int(env["LORA_MAX_RESTARTS"]["value"]) <= 5


def test_the_rendezvous_follows_the_cluster_domain():
    from dataclasses import replace

    settings = replace(SETTINGS, cluster_domain="corp.example")
    env = env_of(trainer(builders.build_training_job(ltj(resources={"gpus": 1, "nodes": 2}), settings)))
    assert env["LORA_RDZV_ENDPOINT"]["value"] == "cats-train-0.cats-workers.team-a.svc.corp.example:29400"


def test_the_workers_service_is_headless_owned_and_selects_only_this_jobs_pods():
    body = ltj(resources={"gpus": 1, "nodes": 2})
    service = builders.build_worker_service(body, SETTINGS)
    assert service["kind"] == "Service" and service["metadata"]["name"] == "cats-workers"
    assert service["metadata"]["namespace"] == "team-a"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {
        "lora-operator.io/job-name": "cats",
        "app.kubernetes.io/component": "trainer",
        "batch.kubernetes.io/job-name": "cats-train",
    }
    (ref,) = service["metadata"]["ownerReferences"]
    assert ref["uid"] == "uid-123" and ref["controller"] is True
    template = builders.build_training_job(body, SETTINGS)["spec"]["template"]["metadata"]["labels"]
    assert all(template.get(k) == v for k, v in service["spec"]["selector"].items() if not k.startswith("batch."))


@pytest.mark.parametrize("owner", ["cats", "team.cats", "7cats", "x" * 63, "a" * 57])
def test_multi_node_children_fit_dns_host_names(owner):
    import re

    children = Children.of(owner, nodes=64)
    label = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    assert label.match(children.service) and len(children.service) <= 63
    assert label.match(children.job) and len(f"{children.job}-63") <= 63  # the host name of worker 63
    assert children.as_status() == {"configMap": children.config_map, "job": children.job, "service": children.service}
    assert Children.of(owner, nodes=64) == children  # deterministic


def test_dotted_and_dashed_owners_never_share_a_service():
    assert Children.of("a.b", 2).service != Children.of("a-b", 2).service


def test_multi_node_builders_do_not_modify_their_input():
    body = ltj(resources={"gpus": 0, "nodes": 3, "processesPerNode": 2, "memory": "4Gi"})
    before = copy.deepcopy(body)
    builders.build_training_job(body, SETTINGS)
    builders.build_worker_service(body, SETTINGS)
    builders.build_cleanup_job(body, SETTINGS)
    assert body == before
    cleanup = builders.build_cleanup_job(body, SETTINGS)["spec"]["template"]["spec"]
    assert "subdomain" not in cleanup  # the clean-up pod is no worker
