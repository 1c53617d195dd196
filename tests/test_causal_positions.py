"""Causal generation stays inside the model's positions; a max_length past them is refused before the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config

from fedlora import workspace
from fedlora.causal import build_causal_lora_model, check_causal_resources, greedy_generations, tiny_tokenizer
from fedlora.config import ConfigError
from fedlora.data.instruct import InstructionExample, encode_instructions
from fedlora.results import read_history
from fedlora.task import evaluate
from tests.conftest import causal_config, one_line_refusal, run_cli

POSITIONS = 128  # tiny-gpt2's at max_length 100: max(128, max_length)
LONG_PROMPT = "what is the topic of this text " * 30  # cut to 98 tokens at max_length 100
LONG_ANSWER = "travel and food " * 20  # 61 tokens with EOS


def gpt2_at_max_length_100():
    config = causal_config("model.name='tiny-gpt2'", "model.max_length=100")
    return config, build_causal_lora_model(config.model, config.seed)


class GenerateSpy:
    """Records how many positions each `generate` call may fill: the prompt's width plus the new tokens."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.generate, self.spans = model.generate, []
        model.generate = self

    def __call__(self, **inputs):
        self.spans.append((inputs["input_ids"].shape[1], inputs["max_new_tokens"]))
        return self.generate(**inputs)


@pytest.mark.parametrize(("asked", "kept"), [(61, 61), (500, POSITIONS - 1)])
def test_a_long_prompt_beside_a_long_answer_is_generated_inside_the_positions(asked: int, kept: int) -> None:
    # Before: IndexError (index out of range in self) from GPT-2's position table.
    config, model = gpt2_at_max_length_100()
    tokenizer = tiny_tokenizer()
    examples = [InstructionExample(response="travel", instruction=LONG_PROMPT), InstructionExample(LONG_ANSWER, "what")]
    data = encode_instructions(tokenizer, examples, config.model.max_length)
    assert int(data.prompt_lengths.max()) + len(data.responses(torch.tensor([1]))[0]) > POSITIONS  # the case at hand
    spy = GenerateSpy(model)
    generations = greedy_generations(model, data, torch.arange(2), tokenizer, asked)
    ((width, new_tokens),) = spy.spans
    assert width + new_tokens <= POSITIONS and new_tokens == kept  # the answer keeps its budget: the prompt is cut
    assert len(generations) == 2 and all(len(g) <= kept for g in generations)


def write_long_rows(path: Path, count: int = 60) -> Path:
    """Alpaca rows alternating a long prompt with a one-word answer and a short prompt with a long answer."""
    rows = [
        {"instruction": LONG_PROMPT, "input": "", "output": "travel"}
        if i % 2
        else {"instruction": "what", "input": "", "output": LONG_ANSWER}
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.usefixtures("datasets_cache")
def test_round_0_evaluation_of_long_instruction_data_on_tiny_gpt2_scores(tmp_path: Path) -> None:
    config = causal_config(
        "model.name='tiny-gpt2'",
        "model.max_length=100",
        "data.exact_match_examples=8",
        f"data.source={str(write_long_rows(tmp_path / 'long.jsonl'))!r}",
    )
    _, model = gpt2_at_max_length_100()
    scores = evaluate(config, model, workspace.test_examples(config), workspace.tokenizer(config))
    assert 0.0 <= scores.accuracy <= 1.0 and scores.loss > 0


def gpt2_folder(path: Path, positions: int) -> Path:
    """A local model folder whose config has `positions` positions (all the check reads)."""
    GPT2Config(n_positions=positions, n_embd=16, n_layer=1, n_head=2).save_pretrained(str(path))
    return path


def test_a_max_length_past_the_model_s_positions_is_refused_naming_the_key(tmp_path: Path) -> None:
    folder = str(gpt2_folder(tmp_path / "gpt2-64", 64))
    check_causal_resources(causal_config(f"model.name={folder!r}", "model.max_length=64").model)
    with pytest.raises(ConfigError, match=r"model.max_length: 100 tokens per example, but .* has 64 positions") as raised:
        check_causal_resources(causal_config(f"model.name={folder!r}", "model.max_length=100").model)
    assert "\n" not in str(raised.value)


def write_experiment(path: Path, model_name: str, max_length: int, source: Path) -> Path:
    """A one-round, one-step causal experiment on `source`, as `fedlora simulate` reads it."""
    path.write_text(
        f"""seed = 7
[model]
task = "causal_lm"
name = {json.dumps(model_name)}
max_length = {max_length}
lora_rank = 4
lora_alpha = 8
[data]
source = {json.dumps(str(source))}
partition = "iid"
exact_match_examples = 8
[federation]
num_clients = 3
clients_per_round = 3
rounds = 1
local_steps = 1
batch_size = 8
"""
    )
    return path


@pytest.mark.usefixtures("datasets_cache")
def test_the_cli_refuses_it_before_the_run_starts_in_one_line(tmp_path: Path) -> None:
    folder = str(gpt2_folder(tmp_path / "gpt2-64", 64))
    experiment = write_experiment(tmp_path / "long.toml", folder, 100, write_long_rows(tmp_path / "long.jsonl"))
    line = one_line_refusal("simulate", str(experiment), "--out", str(tmp_path / "run"))
    assert "model.max_length" in line and "at most 64" in line and not (tmp_path / "run").exists()


@pytest.mark.e2e
@pytest.mark.usefixtures("one_ray", "datasets_cache")
def test_a_tiny_gpt2_run_on_long_instruction_data_finishes_through_the_cli(tmp_path: Path) -> None:
    # Before: the round-0 evaluation ended the run with IndexError (index out of range in self).
    experiment = write_experiment(tmp_path / "long.toml", "tiny-gpt2", 100, write_long_rows(tmp_path / "long.jsonl"))
    code, output = run_cli("simulate", str(experiment), "--out", str(tmp_path / "run"))
    assert code == 0, output
    assert [line["round"] for line in read_history(tmp_path / "run")] == [0, 1]
