"""Adapters and exports that travel: a run's adapter and `fedlora export` load wherever they are copied, with their
tokenizer, labels and prompt, without a "newly initialized" report; `--merged` is a plain transformers model."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hub_constants
from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, pipeline
from transformers.utils import logging as hf_logging

from fedlora import causal, workspace
from fedlora.config import ExperimentConfig
from fedlora.data.instruct import InstructionExample, encode_instructions, render
from fedlora.export import export_adapter
from fedlora.export_causal import ALPACA_CHAT_TEMPLATE, export_causal_adapter, with_chat_template
from fedlora.model import minilm_path
from tests.conftest import causal_config, one_line_refusal, run_cli, tiny_config
from tests.test_adapter_export import CLASSES, FIGURES, trained_model

TEXTS = [
    f"{subject} {verb}"
    for subject in ["the match", "a new telescope", "shares", "the striker", "the lab"]
    for verb in ["ended in a draw", "looked at the galaxy", "fell sharply", "won the cup"]
]  # 20 texts


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every load here must work without the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Models this small run fastest on one thread, and much slower when threads contend for busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def classification_run(tmp_path: Path, config: ExperimentConfig) -> tuple[Path, torch.nn.Module]:
    """A run directory as the server leaves it (its config and adapter), and the model it exported."""
    model = trained_model(config)
    run = tmp_path / "runs" / "fedit"
    run.mkdir(parents=True)
    (run / "config.json").write_text(config.to_json())
    export_adapter(model, run / "adapter", config, CLASSES, FIGURES)
    return run, model


def moved(folder: Path, to: Path, *delete: Path) -> Path:
    """Copy `folder` to `to`, then delete the originals: what a user does moving a run or an export elsewhere."""
    shutil.copytree(folder, to)
    for original in delete:
        shutil.rmtree(original)
    return to


def logits(model: torch.nn.Module, folder: Path) -> torch.Tensor:
    batch = AutoTokenizer.from_pretrained(str(folder))(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


@contextmanager
def load_reports() -> Iterator[list[str]]:
    """The warnings transformers logs while the block runs (its load report among them), at its default verbosity."""
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    hf_logging.add_handler(handler)
    try:
        yield seen
    finally:
        hf_logging.remove_handler(handler)
        hf_logging.set_verbosity(verbosity)


@pytest.mark.parametrize("name", ["tiny", "minilm"])
def test_a_copied_run_loads_after_the_original_is_deleted_with_no_newly_initialized_report(tmp_path: Path, name: str) -> None:
    run, model = classification_run(tmp_path, tiny_config(f"model.name={name!r}"))
    adapter = moved(run, tmp_path / "elsewhere" / "fedit", tmp_path / "runs") / "adapter"
    expected = logits(model, adapter)
    with load_reports() as reports:
        loaded = AutoModelForSequenceClassification.from_pretrained(str(adapter)).eval()
        torch.testing.assert_close(logits(loaded, adapter), expected, rtol=0, atol=1e-5)
        classify = pipeline("text-classification", model=str(adapter))
        with contextlib.chdir(adapter):
            auto = AutoPeftModelForSequenceClassification.from_pretrained(".").eval()
    torch.testing.assert_close(logits(auto, adapter), expected, rtol=0, atol=1e-5)
    assert [answer["label"] for answer in classify(TEXTS)] == [CLASSES[i] for i in expected.argmax(dim=1).tolist()]
    assert not [report for report in reports if "LOAD REPORT" in report or "newly initialized" in report], reports
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "./base"
    assert AutoTokenizer.from_pretrained(str(adapter / "base"))("shares fell")["input_ids"][1] != 100  # not [UNK]


def test_the_packaged_minilm_stays_linked_and_the_head_is_a_small_shard(tmp_path: Path) -> None:
    run, _ = classification_run(tmp_path, tiny_config("model.name='minilm'"))
    base = run / "adapter" / "base"
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    head_file = base / index["classifier.weight"]
    encoder_file = base / index["encoder.layer.0.attention.self.query.weight"]
    packaged = (minilm_path() / "model.safetensors").resolve()
    if packaged.stat().st_dev == tmp_path.stat().st_dev:  # a hard link needs one file system
        assert encoder_file.stat().st_ino == packaged.stat().st_ino
    assert head_file.stat().st_size < 10_000


def test_the_export_loads_wherever_it_is_copied_and_the_merged_model_predicts_as_the_peft_model(tmp_path: Path) -> None:
    run, model = classification_run(tmp_path, tiny_config("model.name='minilm'", "model.train_head=false"))
    assert run_cli("export", str(run), "--to", str(tmp_path / "out" / "adapter"))[0] == 0
    assert run_cli("export", str(run), "--to", str(tmp_path / "out" / "merged"), "--merged")[0] == 0
    shared = {path.stat().st_ino for path in (run / "adapter" / "base").glob("*.safetensors")}
    exported = {path.stat().st_ino for path in (tmp_path / "out" / "adapter" / "base").glob("*.safetensors")}
    assert exported and not exported & shared  # copies: writing into the export leaves the run and the cache alone
    out = moved(tmp_path / "out", tmp_path / "elsewhere", tmp_path / "out", tmp_path / "runs")
    expected = logits(model, out / "adapter")
    predicted = [CLASSES[i] for i in expected.argmax(dim=1).tolist()]
    with load_reports() as reports:
        loaded = AutoModelForSequenceClassification.from_pretrained(str(out / "adapter")).eval()
        with contextlib.chdir(out / "adapter"):
            auto = AutoPeftModelForSequenceClassification.from_pretrained(".").eval()
        merged = AutoModelForSequenceClassification.from_pretrained(str(out / "merged")).eval()
        answers = pipeline("text-classification", model=str(out / "merged"))(TEXTS)
    for each in (loaded, auto, merged):
        torch.testing.assert_close(logits(each, out / "adapter"), expected, rtol=0, atol=1e-4)
    assert [answer["label"] for answer in answers] == predicted
    assert not [report for report in reports if "LOAD REPORT" in report], reports
    assert not (out / "merged" / "adapter_config.json").exists()
    card = (out / "merged" / "README.md").read_text()
    assert "library_name: transformers" in card and "(merged into its weights)" in card and "## Labels" in card


def test_bad_export_inputs_are_refused_in_one_line_and_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, _ = classification_run(tmp_path, tiny_config())
    # A current folder whose parent holds neither the run nor the test's folders, wherever the checkout is.
    workdir = tmp_path / "elsewhere" / "work"
    workdir.mkdir(parents=True)
    monkeypatch.chdir(workdir)
    (tmp_path / "not-a-run").mkdir()
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((run / "config.json").read_text())
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    (tmp_path / "a-file").write_text("")
    for args, expected in [
        ([str(tmp_path / "not-a-run"), "--to", str(tmp_path / "x")], "not a run directory"),
        ([str(unfinished), "--to", str(tmp_path / "x")], "the run has no adapter"),
        ([str(run), "--to", str(taken)], "not empty"),
        ([str(run), "--to", str(tmp_path / "a-file")], "a file is there"),
        ([str(run), "--to", str(tmp_path / "runs"), "--overwrite"], "holds the run"),
        ([str(run), "--to", str(run / "adapter" / "copy")], "inside its adapter"),
        ([str(run), "--to", str(taken), "--overwrite"], "other than an export"),
        ([str(run), "--to", str(Path.cwd()), "--overwrite"], "holds the current folder"),
        ([str(run), "--to", str(Path.cwd().parent), "--overwrite"], "holds the current folder"),
        ([str(run), "--to", "/", "--overwrite"], "holds the run"),
    ]:
        assert expected in one_line_refusal("export", *args)
    assert (taken / "keep.txt").read_text() == "mine" and not (tmp_path / "x").exists()
    assert not list(tmp_path.rglob("*.partial"))


# --- causal LMs ---------------------------------------------------------------------------
QUESTIONS = [
    InstructionExample(response="sports", instruction="What is the topic of this text?", input="a story about football."),
    InstructionExample(response="politics", instruction="What is the topic of this text?", input="a story about elections."),
]


def memorized_causal_model(config: ExperimentConfig) -> torch.nn.Module:
    """The tiny Llama's LoRA trained on QUESTIONS until it answers them (a second on one CPU thread)."""
    model = causal.build_causal_lora_model(config.model, config.seed)
    data = encode_instructions(workspace.tokenizer(config), QUESTIONS, config.model.max_length)
    batch = data.batch(torch.arange(len(QUESTIONS)))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    for _ in range(60):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    return model.eval()


def turns(example: InstructionExample) -> list[dict[str, str]]:
    """An Alpaca example as the messages the shipped chat template reads (the card says so)."""
    return [{"role": "user", "content": example.instruction}] + (
        [{"role": "input", "content": example.input}] if example.input else []
    )


def test_the_shipped_chat_template_writes_the_prompt_training_read() -> None:
    config = causal_config()
    tokenizer = workspace.tokenizer(config)
    shipped = with_chat_template(tokenizer, ALPACA_CHAT_TEMPLATE)
    for example in [QUESTIONS[0], InstructionExample(response="sports", instruction="Name the topic.")]:
        prompt = shipped.apply_chat_template(turns(example), add_generation_prompt=True, tokenize=False)
        assert prompt == render(tokenizer, example)[0]
    assert tokenizer.chat_template != ALPACA_CHAT_TEMPLATE  # the run's own tokenizer is left as it was


def test_a_copied_causal_run_answers_with_the_shipped_template_and_its_card_is_filled(tmp_path: Path) -> None:
    config = causal_config()
    model = memorized_causal_model(config)
    run = tmp_path / "runs" / "causal"
    run.mkdir(parents=True)
    (run / "config.json").write_text(config.to_json())
    export_causal_adapter(model, run / "adapter", config, workspace.tokenizer(config), FIGURES)
    assert run_cli("export", str(run), "--to", str(tmp_path / "merged"), "--merged")[0] == 0
    copy = moved(run, tmp_path / "elsewhere" / "causal", tmp_path / "runs")
    adapter = copy / "adapter"
    with load_reports() as reports, contextlib.chdir(adapter):
        auto = AutoPeftModelForCausalLM.from_pretrained(".").eval()
    embedded = AutoModelForCausalLM.from_pretrained(str(adapter)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert not [report for report in reports if "LOAD REPORT" in report], reports
    for (each, folder), question in itertools.product(
        [(auto, adapter), (embedded, adapter), (merged, tmp_path / "merged")], QUESTIONS
    ):
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        text = tokenizer.apply_chat_template(turns(question), add_generation_prompt=True, tokenize=False)
        assert text == render(workspace.tokenizer(config), question)[0]  # what training read
        prompt = tokenizer.apply_chat_template(turns(question), add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            output = each.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
        assert answer.strip() == question.response, (folder, answer)
    card = (adapter / "README.md").read_text()
    assert "More Information Needed" not in card
    for expected in ["pipeline_tag: text-generation", "## Prompt", "### Instruction:", "| final exact match | 0.6125 on 60"]:
        assert expected in card, expected
