"""docs/operator.md keeps up with the code: every spec field, setting and reason is documented."""

from pathlib import Path

import yaml

from lora_operator.reasons import PERMANENT_EXIT_REASONS, Reason
from lora_operator.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "operator.md").read_text()


def leaf_paths(schema, prefix=()):
    for key, sub in (schema.get("properties") or {}).items():
        path = (*prefix, key)
        yield path
        if sub.get("type") == "object":
            yield from leaf_paths(sub, path)


def test_every_spec_field_is_in_the_reference():
    crd = yaml.safe_load((REPO / "crds" / "loratrainingjobs.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    missing = [".".join(p) for p in leaf_paths(spec) if f"| `{'.'.join(p)}`" not in DOC]
    assert not missing, f"docs/operator.md lacks {missing}"


def test_every_setting_is_documented():
    missing = [name for name, _, _ in Settings.reference() if f"`{name}`" not in DOC]
    assert not missing


def test_every_reason_is_documented():
    reasons = {v for k, v in vars(Reason).items() if k.isupper()} - {Reason.CRASHED, Reason.INTERRUPTED}
    reasons |= set(PERMANENT_EXIT_REASONS.values())
    missing = [r for r in sorted(reasons) if f"`{r}`" not in DOC]
    assert not missing
