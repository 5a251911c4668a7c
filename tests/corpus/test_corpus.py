"""The corpus tier: every case under tests/corpus/cases/ is a hostile or odd input run through lora-train
against the real services (SeaweedFS for its S3 cases); each ends with the exit code, reason and message
its case.yaml expects. No hostile input may crash the trainer (exit 1) or leave finished-looking output.

How to add a case: tests/corpus/README.md.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from lora_trainer.cli import main
from lora_trainer.errors import ExitCode
from tests.corpus import builders
from tests.integration.trainer_world import SAMPLE, ListingRewriter, upload_folder

pytestmark = pytest.mark.integration
CASES_DIR = Path(__file__).parent / "cases"
CASES = sorted(p.parent for p in CASES_DIR.rglob("case.yaml"))
BASES = {
    "text-to-image": {
        "base_model": "preset:tiny-sd",
        "resolution": 16,
        "lora_rank": 4,
        "batch_size": 2,
        "max_train_steps": 2,
        "save_steps": 0,
        "seed": 7,
        "metrics_port": 0,
    },
    "text-generation": {
        "task_type": "text-generation",
        "base_model": "preset:tiny-llm",
        "max_seq_length": 64,
        "lora_rank": 4,
        "batch_size": 2,
        "max_train_steps": 2,
        "save_steps": 0,
        "seed": 7,
        "metrics_port": 0,
    },
}
DATASETS = {"images": SAMPLE / "images", "text": SAMPLE / "text", "empty": None}
SPEC_KEYS = {
    "about", "task", "dataset", "build", "config", "storage", "output", "objects", "prior_run", "damage_output",
    "env", "manifest", "expect",
}  # fmt: skip


def load_case(folder: Path) -> dict[str, Any]:
    spec = yaml.safe_load((folder / "case.yaml").read_text())
    unknown = set(spec) - SPEC_KEYS
    assert not unknown, f"{folder}: unknown case.yaml keys {unknown}"
    assert spec.get("about"), f"{folder}: say in `about` what the case is for"
    assert "exit" in spec.get("expect", {}), f"{folder}: expect.exit is required"
    return spec


def test_the_corpus_covers_every_area_with_at_least_40_cases():
    areas = {case.parent.name for case in CASES}
    assert {"images", "captions", "jsonl", "s3", "checkpoints", "config", "manifests"} <= areas
    assert len(CASES) >= 40


@pytest.mark.parametrize("folder", CASES, ids=[f"{c.parent.name}/{c.name}" for c in CASES])
def test_case(folder, tmp_path, request, monkeypatch, capfd):
    spec = load_case(folder)
    for name, value in (spec.get("env") or {}).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LORA_TERMINATION_MESSAGE_PATH", str(tmp_path / "termination-log"))
    data = build_dataset(folder, spec, tmp_path)
    places = {"data": str(data), "out": str(tmp_path / "out"), "tmp": str(tmp_path)}
    if "s3" in (spec.get("storage"), spec.get("output")):
        places.update(stage_s3(folder, spec, data, request, tmp_path))
    config_path = write_config(folder, spec, places, tmp_path)
    if spec.get("prior_run") is not None:
        # the earlier run starts afresh unless prior_run says otherwise; the case's `resume` is for the second
        prior = {**yaml.safe_load(config_path.read_text()), "resume": None, **spec["prior_run"]}
        (tmp_path / "prior.yaml").write_text(yaml.safe_dump(prior))
        assert main(["--config", str(tmp_path / "prior.yaml")]) == 0, capfd.readouterr().err[-3000:]
        damage(Path(places["out"]), spec.get("damage_output") or [])
    capfd.readouterr()

    code = main(["--config", str(config_path)])
    log = capfd.readouterr().err
    message = json.loads((tmp_path / "termination-log").read_text())
    check_outcome(spec["expect"], code, message, log, places)


def build_dataset(folder: Path, spec: dict, tmp_path: Path) -> Path:
    task = spec.get("task", "text-to-image")
    source = DATASETS[spec.get("dataset", "images" if task == "text-to-image" else "text")]
    data = tmp_path / "data"
    if source is not None:
        shutil.copytree(source, data)
    data.mkdir(exist_ok=True)
    for path in folder.iterdir():  # the case's own files overlay the dataset
        if path.name not in ("case.yaml", spec.get("manifest")):
            shutil.copy(path, data / path.name) if path.is_file() else shutil.copytree(path, data / path.name)
    damage(data, spec.get("build") or [])
    return data


def damage(folder: Path, steps: list[dict]) -> None:
    for step in steps:
        ((name, arguments),) = step.items()
        getattr(builders, name)(folder, **arguments)


def stage_s3(folder: Path, spec: dict, data: Path, request, tmp_path: Path) -> dict[str, str]:
    """The dataset uploaded to a fresh bucket (plus the case's extra objects, whose placeholders DOTDOT,
    BACKSLASH and LONGSEGMENT a proxy rewrites in listings: keys SeaweedFS will not store but AWS S3 does)."""
    server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
    client = server.client()
    for name, value in server.env().items():
        request.getfixturevalue("monkeypatch").setenv(name, value)
    places = {"bucket": bucket, "out_s3": f"s3://{bucket}/runs/case"}
    if spec.get("storage") == "s3":
        upload_folder(client, bucket, "datasets/case", data)
        places["data"] = f"s3://{bucket}/datasets/case"
    for obj in spec.get("objects") or []:
        body = (folder / obj["file"]).read_bytes() if "file" in obj else obj.get("text", "").encode()
        client.put_object(Bucket=bucket, Key=obj["key"].format(**places), Body=body)
    if spec.get("output") == "s3":
        places["out"] = places["out_s3"]
    endpoint = server.endpoint_url
    placeholders = [p.decode() for p in ListingRewriter.REWRITES]
    if any(p in obj["key"] for obj in spec.get("objects") or [] for p in placeholders):
        proxy = ListingRewriter(server.endpoint_url)
        request.addfinalizer(proxy.shutdown)
        endpoint = proxy.url
    places["endpoint"] = endpoint
    places["cache"] = str(tmp_path / "cache")
    return places


def write_config(folder: Path, spec: dict, places: dict[str, str], tmp_path: Path) -> Path:
    if spec.get("manifest"):
        text = (folder / spec["manifest"]).read_text()
        path = tmp_path / "manifest.yaml"
        path.write_text(fill_in(text, places))
        return path
    task = spec.get("task", "text-to-image")
    config = {**BASES[task], "train_data_dir": places["data"], "output_dir": places["out"]}
    if "endpoint" in places:
        config.update(s3_endpoint_url=places["endpoint"], s3_cache_dir=places["cache"], s3_retry_seconds=5)
    config.update(spec.get("config") or {})
    path = tmp_path / "cfg.yaml"
    path.write_text(fill_in(yaml.safe_dump(config, allow_unicode=True), places))
    return path


def fill_in(text: str, places: dict[str, str]) -> str:
    return re.sub(r"\{(data|out|tmp|bucket|out_s3|endpoint)\}", lambda m: places[m.group(1)], text)


def check_outcome(expect: dict, code: int, message: dict, log: str, places: dict[str, str]) -> None:
    detail = f"exit {code}, termination message {message}\n{log[-3000:]}"
    assert code != ExitCode.CRASH or expect["exit"] == ExitCode.CRASH, f"a hostile input crashed the trainer: {detail}"
    assert code == expect["exit"], detail
    if code == 0:
        assert message["status"] == "succeeded", detail
    else:
        assert message["reason"] == expect.get("reason", message["reason"]), detail
        assert message["permanent"] is ExitCode(code).permanent, detail
        if not places["out"].startswith("s3://"):
            assert not (Path(places["out"]) / "pytorch_lora_weights.safetensors").exists(), detail
    if "error" in expect:
        assert re.search(expect["error"], message.get("error") or ""), detail
    if "log" in expect:
        assert re.search(expect["log"], log), detail
