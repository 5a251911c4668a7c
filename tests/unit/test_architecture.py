"""docs/architecture.md stays true: the dependency direction holds, every path that code and docs mention
exists, the module map names every module, and the contract tables match the code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARCHITECTURE = (REPO / "docs" / "architecture.md").read_text()
PACKAGES = {
    "lora_trainer": REPO / "trainer_image" / "lora_trainer",
    "lora_operator": REPO / "operator" / "lora_operator",
}


def test_the_dependency_direction_holds():
    """import-linter with the contracts in pyproject.toml: layers of the trainer, torch-free modules, the operator."""
    lint = Path(sys.executable).parent / "lint-imports"
    out = subprocess.run(
        [str(lint), "--config", str(REPO / "pyproject.toml")], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert re.search(r"Contracts: [1-9]\d* kept, 0 broken", out.stdout), out.stdout[-2000:]


# -- paths named in code and docs
ROOTS = r"(?:tests|docs|scripts|trainer_image|operator|charts|crds|examples|benchmarks|deploy|\.ci|lora_trainer|lora_operator)"
PATH = re.compile(rf"(?<![\w./:-]){ROOTS}/[\w./-]*[\w/]")  # a URL's path is preceded by '/' and not matched
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
TEXT_SUFFIXES = {".py", ".md", ".sh", ".yaml", ".yml", ".toml", ".txt", ""}


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [REPO / f for f in listed if Path(f).suffix in TEXT_SUFFIXES and (REPO / f).is_file()]


def missing_paths(path: Path) -> list[str]:
    text = path.read_text(errors="replace")
    missing = []
    for match in PATH.finditer(text):
        token = match.group(0).rstrip("/.")
        follows = text[match.end() : match.end() + 1]
        if follows and follows in "<*{-":  # a pattern: state_step_<N>/, logs/*, loratrainingjob-<family>.yaml
            continue
        candidates = [REPO / token, REPO / "trainer_image" / token, REPO / "operator" / token, path.parent / token]
        if not any(c.exists() for c in candidates):
            missing.append(token)
    if path.suffix == ".md":
        missing += [
            f"link {m.group(1)}"
            for m in LINK.finditer(text)
            if not m.group(1).startswith(("http://", "https://", "mailto:")) and not (path.parent / m.group(1)).exists()
        ]
    return missing


def test_every_path_that_code_and_docs_mention_exists():
    broken = {str(p.relative_to(REPO)): m for p in tracked_text_files() if (m := missing_paths(p))}
    assert broken == {}


def test_the_path_check_finds_a_missing_path(tmp_path):
    doc = tmp_path / "note.md"
    missing = "tests/unit/" + "test_no_such_file.py"  # spelled apart, so this file itself does not name it
    doc.write_text(f"see {missing} and [x](nowhere.md), not state_step_<N>/ or https://example.com/docs/x.md")
    assert missing_paths(doc) == [missing, "link nowhere.md"]


# -- the module map
def modules(package: str) -> set[str]:
    root = PACKAGES[package]
    names = set()
    for path in root.rglob("*.py"):
        rel = path.relative_to(root.parent).as_posix()
        names.add(rel[: -len("__init__.py")] if path.name == "__init__.py" else rel)
    return names - {f"{package}/"}


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_the_module_map_names_every_module(package):
    mapped = set(re.findall(rf"^\| `({package}/[\w/.]*)` \|", ARCHITECTURE, re.M))
    assert modules(package) - mapped == set(), "modules missing from docs/architecture.md"
    assert mapped - modules(package) == set(), "docs/architecture.md maps modules that do not exist"


# -- contract tables
def test_the_exit_code_table_is_the_code():
    from lora_trainer.errors import PERMANENT_EXIT_CODES, ExitCode, TrainError

    rows = re.findall(r"^\| (\d+) \| (\w+) \| *(\w*) *\| [^|]+ \| ([^|]+) \|$", ARCHITECTURE, re.M)
    assert {(int(code), name) for code, name, _, _ in rows} == {(c.value, c.name) for c in ExitCode}
    permanent = {int(code) for code, _, _, operator in rows if "permanent" in operator}
    assert permanent == {int(c) for c in PERMANENT_EXIT_CODES}
    reasons = {int(code): reason for code, _, reason, _ in rows if reason}
    errors = {cls.exit_code.value: cls.reason for cls in all_subclasses(TrainError)}
    assert reasons == {**errors, ExitCode.CRASH.value: TrainError.reason}


def all_subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *all_subclasses(sub))]


def exposed_metric_names(registry) -> set[str]:
    """The names as a scrape shows them (a counter gains _total), whether or not a sample exists yet."""
    return {f"{m.name}_total" if m.type == "counter" else m.name for m in registry.collect()}


def listed_metrics(prefix: str) -> set[str]:
    return set(re.findall(rf"`({prefix}_[a-z_]+)(?:\{{[^}}]*\}})?`", ARCHITECTURE))


def test_the_trainer_metrics_are_the_listed_ones():
    from lora_trainer.metrics import TrainerMetrics

    metrics = TrainerMetrics(job_name="j", namespace="n")
    assert exposed_metric_names(metrics.registry) == listed_metrics("lora_train")


def test_the_operator_metrics_are_the_listed_ones():
    from lora_operator.observability import OperatorMetrics

    assert exposed_metric_names(OperatorMetrics().registry) == listed_metrics("lora_operator")
