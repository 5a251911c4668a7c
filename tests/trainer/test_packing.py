"""Packed LLM batches (`packing: true`) and the LLM memory switches, on the tiny Llama.

A packed batch gives every sample exactly the loss it has alone (completion-only and assistant-only masks
included); packed runs resume exactly and report truncation; the chunked cross-entropy equals the full one
in value and gradients without ever computing more than a chunk of logits; gradient checkpointing changes
nothing but memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lora_trainer.data.packing import Packed, Padded
from lora_trainer.data.text import IGNORE_INDEX, tokenize_dataset
from lora_trainer.lm_loss import causal_lm_loss
from lora_trainer.presets import preset_path
from lora_trainer.tasks.text_generation import load_tokenizer

from .conftest import LLM_BASE, assert_resumes_exactly, make_config, run


@pytest.fixture(scope="module")
def samples():
    """Completion-only (arithmetic) and assistant-only (chat) samples of different lengths."""
    cfg = make_config(LLM_BASE, "unused")
    tokenizer = load_tokenizer(cfg)
    data = LLM_BASE["train_data_dir"]
    examples = [
        *tokenize_dataset(f"{data}/arithmetic.jsonl", tokenizer, "auto", 64).examples[:5],
        *tokenize_dataset(f"{data}/chat.jsonl", tokenizer, "auto", 64).examples[:3],
    ]
    assert any(e.labels[0] == IGNORE_INDEX and e.labels[-1] != IGNORE_INDEX for e in examples)  # masks in play
    return examples, tokenizer.pad_token_id


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(preset_path("preset:tiny-llm"), attn_implementation="sdpa").eval()


def token_losses(model, batch) -> torch.Tensor:
    """(B, T): the cross-entropy of each position's prediction of the next label (0 where none is trained)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits
    targets = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
    return F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")


def test_a_packed_batch_gives_every_sample_its_loss_alone(samples, model):
    examples, pad = samples
    packed = Packed(examples, capacity=128, pad_id=pad)
    assert any(len(row) > 2 for row in packed.rows)
    rows = [[examples[i] for i in row] for row in packed.rows]
    losses = token_losses(model, packed.collate(rows))
    for r, row in enumerate(rows):
        start = 0
        for sample in row:
            n = len(sample.input_ids)
            alone = token_losses(model, Padded([sample], pad).collate([sample]))[0]
            assert torch.allclose(losses[r, start : start + n], alone, atol=1e-5), (r, start)
            start += n


def test_a_packed_batch_has_the_mean_loss_of_the_padded_batch(samples, model):
    examples, pad = samples
    packed = Packed(examples, capacity=128, pad_id=pad)
    rows = packed.collate([[examples[i] for i in row] for row in packed.rows])
    padded = Padded(examples, pad).collate(examples)
    with torch.no_grad():
        assert torch.allclose(model(**rows, use_cache=False).loss, model(**padded, use_cache=False).loss, atol=1e-6)


def test_packed_runs_resume_exactly_and_report_truncation(tmp_path):
    resumed = assert_resumes_exactly(LLM_BASE, tmp_path, packing=True, max_train_steps=4)
    summary = resumed.summary.data_summary
    assert summary["packed_rows"] < summary["examples"]
    assert any("truncated" in w for w in resumed.summary.warnings)  # 4 records exceed max_seq_length=64


def test_an_epoch_of_rows_trains_every_sample_and_token_once(tmp_path):
    epoch = {"max_train_steps": None, "epochs": 1, "save_steps": 0}
    plain = run(LLM_BASE, tmp_path / "plain", **epoch)
    packed = run(LLM_BASE, tmp_path / "packed", packing=True, **epoch)
    assert packed.summary.samples == plain.summary.samples == packed.summary.data_summary["examples"]
    assert packed.summary.tokens == plain.summary.tokens
    assert packed.summary.step < plain.summary.step  # batch_size counts rows: fewer, fuller steps


def test_chunked_cross_entropy_equals_the_full_loss_and_its_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=False)
    labels = torch.randint(0, 50, (2, 7))
    labels[0, :3] = IGNORE_INDEX  # a prompt
    full = F.cross_entropy(head(hidden)[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    full_grads = torch.autograd.grad(full, [hidden, head.weight])
    shapes = []
    head.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    chunked = causal_lm_loss(hidden, head, labels, chunk_tokens=3)
    chunked_grads = torch.autograd.grad(chunked, [hidden, head.weight])
    assert torch.allclose(chunked, full, atol=1e-6)
    for a, b in zip(chunked_grads, full_grads):
        assert torch.allclose(a, b, atol=1e-6)
    trained = int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert max(rows for rows, _ in shapes) == 3  # never more than a chunk of logits, in forward or backward
    assert sum(rows for rows, _ in shapes) == 2 * trained  # each chunk once forward, once recomputed in backward


def test_chunked_cross_entropy_of_a_batch_without_trained_tokens_is_zero_and_backpropagates():
    hidden = torch.randn(1, 4, 16, requires_grad=True)
    labels = torch.tensor([[5, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])  # label 0 is never predicted
    loss = causal_lm_loss(hidden, torch.nn.Linear(16, 50, bias=False), labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(hidden.grad) == 0


@pytest.mark.parametrize(
    "switch", [{"chunked_cross_entropy": True}, {"gradient_checkpointing": True}], ids=["chunked", "checkpointing"]
)
def test_memory_switches_train_like_the_plain_run(tmp_path, switch):
    plain = run(LLM_BASE, tmp_path / "plain", packing=True, max_train_steps=3, save_steps=0)
    switched = run(LLM_BASE, tmp_path / "switched", packing=True, max_train_steps=3, save_steps=0, **switch)
    assert [loss for _, loss in switched.summary.losses] == pytest.approx(
        [loss for _, loss in plain.summary.losses], abs=1e-5
    )


def test_chunked_cross_entropy_refuses_models_that_change_their_logits():
    from transformers import Gemma2Config

    from lora_trainer.errors import ConfigError
    from lora_trainer.tasks.text_generation import check_plain_logits

    with pytest.raises(ConfigError, match="chunked_cross_entropy: gemma2 .*final_logit_softcapping"):
        check_plain_logits(Gemma2Config(final_logit_softcapping=30.0))
    check_plain_logits(Gemma2Config(final_logit_softcapping=None))


@pytest.mark.slow
def test_torch_compile_trains_like_eager(tmp_path):
    """Compiling takes minutes on a CPU; the compiled decoder computes the same losses."""
    eager = run(LLM_BASE, tmp_path / "eager", packing=True, max_train_steps=2, save_steps=0)
    compiled = run(LLM_BASE, tmp_path / "compiled", packing=True, max_train_steps=2, save_steps=0, torch_compile=True)
    assert compiled.task.causal_lm.get_decoder()._compiled_call_impl is not None
    assert [loss for _, loss in compiled.summary.losses] == pytest.approx(
        [loss for _, loss in eager.summary.losses], abs=1e-4
    )


def test_torch_compile_without_a_cpp_compiler_is_refused_at_start(tmp_path, capsys, monkeypatch):
    """On CPU inductor builds C++: with no compiler the run stops before anything loads (exit 2), naming the fix."""
    from torch._inductor import cpp_builder, exc

    from lora_trainer.compat import CompilerForTorchCompile
    from lora_trainer.errors import ExitCode

    from .test_bad_inputs import run_cli

    assert CompilerForTorchCompile("cpu").problem() is None  # this machine has g++

    def no_compiler(*args):
        raise exc.InvalidCxxCompiler

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    loaded = []
    monkeypatch.setattr("lora_trainer.recipe.TrainingRecipe.setup", lambda self: loaded.append(self))
    code, err = run_cli(tmp_path, capsys, LLM_BASE, torch_compile=True, device="cpu")
    assert code == ExitCode.CONFIG_INVALID and "ConfigInvalid" in err
    assert "torch_compile: true on cpu needs a C++ compiler" in err and "torch_compile: false" in err
    assert loaded == []
