"""uv.lock is the tested dependency set, and every install path (setup, CI, both images) installs it."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[2]
LOCK = tomllib.loads((REPO / "uv.lock").read_text())
PACKAGES = {p["name"]: p for p in LOCK["package"]}
PROJECT = "lora-operator"


def closure(extras: list[str]) -> dict[str, str]:
    """name -> locked version of everything the project with these extras installs."""
    root = PACKAGES[PROJECT]
    todo = [*root.get("dependencies", []), *(d for e in extras for d in root["optional-dependencies"][e])]
    seen: dict[str, str] = {}
    while todo:
        dep = todo.pop()
        if dep["name"] in seen or ("marker" in dep and not Marker(dep["marker"]).evaluate()):
            continue
        seen[dep["name"]] = PACKAGES[dep["name"]]["version"]
        todo += PACKAGES[dep["name"]].get("dependencies", [])
    return seen


def installed(name: str) -> str | None:
    """The version import resolves: the first on sys.path. (Once anything imports setuptools, sys.path also ends
    in setuptools/_vendor, whose own packaging/zipp/importlib-metadata dist-infos are not the venv's.)"""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def test_every_locked_package_has_hashes():
    unhashed = [
        p["name"]
        for p in LOCK["package"]
        if p["name"] != PROJECT
        and not all("hash" in w for w in p.get("wheels", []) + ([p["sdist"]] if "sdist" in p else []))
    ]
    assert unhashed == []


def test_the_lock_is_resolved_for_the_interpreter_the_suite_and_images_run():
    python = (REPO / ".python-version").read_text().strip()
    (markers,) = (Marker(m) for m in LOCK["supported-markers"])
    assert markers.evaluate({"python_full_version": f"{python}.7"})
    assert not markers.evaluate({"python_full_version": "3.12.0"})
    assert not SpecifierSet(LOCK["requires-python"]).contains("3.10.9")  # 3.10 reached its end of life in 2026-10
    assert re.search(rf"PYTHON_IMAGE=python:{re.escape(python)}\.\d+-", (REPO / "Dockerfile").read_text())


def test_the_operator_image_gets_no_torch():
    operator = closure(["operator"])
    assert "kopf" in operator and "torch" not in operator and "diffusers" not in operator
    assert "torch" in closure(["trainer"])


def test_this_environment_is_the_lock():
    """What setup.sh installs: a venv that drifted from the lock (a cached one, a manual pip install) fails here."""
    import setuptools  # noqa: F401  -- as in a full suite run, where some earlier test imported it

    want = closure(["trainer", "operator", "test"])
    drift = {n: (installed(n), v) for n, v in want.items() if installed(n) != v}
    assert drift == {}, "installed vs locked: " + ", ".join(f"{n} {h} (lock {v})" for n, (h, v) in drift.items())


@pytest.mark.parametrize("path", ["scripts/setup.sh", "Dockerfile"])
def test_every_install_path_syncs_the_lock(path):
    text = (REPO / path).read_text()
    assert re.search(r"uv(\.sh)? sync --locked", text)
    pip_installs = re.findall(r"pip install[^\n]*", text)
    assert all("--require-hashes -r scripts/uv-requirements.txt" in line for line in pip_installs), pip_installs
    ci = (REPO / ".ci/run").read_text()
    assert "scripts/setup.sh" in ci and "pip install" not in ci
