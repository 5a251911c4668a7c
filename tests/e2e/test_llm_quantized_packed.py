"""examples/loratrainingjob-qlora.yaml through the operator on the tiny Llama: a 4-bit (nf4) base, packed samples
and the chunked loss, from `kubectl apply` to an adapter in S3. The same job with an int8 base and packing
alone trains too."""

from pathlib import Path

import pytest
import yaml

from tests.e2e import operator_env as env

from .test_training import check_success

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "loratrainingjob-qlora.yaml"


@pytest.mark.parametrize(
    ("name", "training"),
    [
        ("qlora-example", {}),  # nf4, chunked cross-entropy and checkpointing, as the example says
        ("int8-packed", {"baseQuantization": "int8", "chunkedCrossEntropy": None, "gradientCheckpointing": None}),
    ],
)
def test_a_quantized_packed_llm_job_trains_through_the_operator(jobs, name, training):
    example = yaml.safe_load(EXAMPLE.read_text())
    tiny = {
        "baseModel": "preset:tiny-llm",
        "dataset": {"uri": f"s3://{jobs.bucket}/data/text", "maxSeqLength": 64, "format": None},
        "training": {
            "steps": 4,
            "batchSize": 2,
            "gradientAccumulationSteps": 1,
            "learningRate": 1e-3,
            "precision": "no",  # bf16 autocast on a 1-CPU pod only slows it down
            "warmupSteps": 0,
            **training,
        },
        "output": {"uri": f"s3://{jobs.bucket}/out/{name}", "saveSteps": 2},
        "resources": {"gpus": 0, "cpu": "1", "memory": "4Gi"},
        "s3": None,
    }
    manifest = env._merge({**example, "metadata": {"name": name}}, {"spec": tiny})
    jobs.apply(manifest)
    assert jobs.wait_condition(name, "Succeeded", 400).returncode == 0, jobs.status(name)
    check_success(jobs, name, 4, 2, {"peft"})
    used = yaml.safe_load(jobs.s3_bytes(f"s3://{jobs.bucket}/out/{name}/config_backup.yaml"))
    mode = training.get("baseQuantization", "nf4")
    assert (used["base_quantization"], used["packing"]) == (mode, True)
    assert used["chunked_cross_entropy"] is (name == "qlora-example")
