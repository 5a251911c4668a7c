"""The installed libraries are checked against what the config asks, before anything loads (compat.py)."""

from __future__ import annotations

import importlib.metadata

import pytest
import transformers.integrations.peft as transformers_peft

from lora_trainer.compat import PeftThrough
from lora_trainer.errors import ExitCode
from lora_trainer.tasks import task_class

from .conftest import LLM_BASE, SD_BASE
from .test_bad_inputs import run_cli


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_the_locked_libraries_can_train_what_the_configs_ask(train_text_encoder):
    """Fails when uv.lock pairs a diffusers or transformers with a peft older than it declares it needs."""
    from lora_trainer.config import build_config

    cfg = build_config({**SD_BASE, "output_dir": "unused", "train_text_encoder": train_text_encoder})
    needs = task_class(cfg.task_type).library_needs(cfg)
    assert [n.library for n in needs] == ["diffusers", "transformers"][: 1 + train_text_encoder]
    assert [n.problem() for n in needs] == [None] * len(needs)


def test_a_transformers_that_needs_a_newer_peft_stops_the_run_before_any_model_loads(tmp_path, capsys, monkeypatch):
    """transformers 5.24 declares MIN_PEFT_VERSION 0.22.0; peft 0.21.2 was the newest served. Same situation here."""
    monkeypatch.setattr(transformers_peft, "MIN_PEFT_VERSION", "99.0.0")
    loaded = []
    monkeypatch.setattr("lora_trainer.recipe.TrainingRecipe.setup", lambda self: loaded.append(self))

    code, err = run_cli(tmp_path, capsys, SD_BASE, train_text_encoder=True)

    assert code == ExitCode.CONFIG_INVALID and "ConfigInvalid" in err
    peft = importlib.metadata.version("peft")
    assert "train_text_encoder: true adds LoRA layers through transformers" in err
    assert f"transformers {importlib.metadata.version('transformers')}" in err
    assert f"needs peft>=99.0.0, but peft {peft} is installed" in err
    assert "pip install 'peft>=99.0.0'" in err and "uv.lock" in err
    assert loaded == [] and not (tmp_path / "out").exists()  # nothing prepared, nothing loaded


def test_without_text_encoder_lora_the_same_libraries_are_fine(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(transformers_peft, "MIN_PEFT_VERSION", "99.0.0")
    code, err = run_cli(tmp_path, capsys, SD_BASE, train_text_encoder=False, max_train_steps=1)
    assert code == ExitCode.OK, err


def test_text_generation_declares_no_integration_need():
    from lora_trainer.config import build_config

    cfg = build_config({**LLM_BASE, "output_dir": "unused"})
    assert task_class(cfg.task_type).library_needs(cfg) == []


def test_a_library_without_a_declaration_is_no_problem():
    assert PeftThrough("x", "transformers", "transformers.integrations.peft:NO_SUCH_CONSTANT").problem() is None


def test_every_task_of_the_config_schema_has_a_class():
    from lora_trainer.config.schema import TASKS
    from lora_trainer.tasks import TASK_CLASSES

    assert tuple(TASK_CLASSES) == TASKS
    assert all(task_class(t).__name__.endswith("Task") for t in TASKS)
