"""Causal LMs: target-module defaults, prompt rendering, response-only labels, scores, layer shapes, config rules."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

from clients.trainer import TrainPlan, train_local
from fedlora import workspace
from fedlora.causal import (
    build_causal_lora_model,
    causal_lora_config,
    default_target_modules,
    is_exact_match,
    sequence_losses,
    tiny_tokenizer,
)
from fedlora.config import ConfigError, config_from_dict, load_config
from fedlora.data.instruct import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE_INDEX,
    InstructionExample,
    encode_instructions,
    render,
)
from fedlora.data.instruct_task import generate_instruction_task
from fedlora.lora import LoraState
from fedlora.task import evaluate
from strategies.fedsvd import refactorize
from tests.conftest import causal_config

ALPACA = InstructionExample(response="politics", instruction="What is the topic of this text?", input="a story about elections.")
CHAT = InstructionExample(
    response="sports", messages=(("system", "you are a helpful assistant"), ("user", "say in one word what this is about"))
)


# --- target modules -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("hf_config", "expected"),
    [
        (
            LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
            ["q_proj", "v_proj"],
        ),
        (
            Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
            ["q_proj", "v_proj"],
        ),
        (GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2), ["c_attn"]),
    ],
    ids=["llama", "qwen2", "gpt2"],
)
def test_target_modules_default_to_peft_s_choice_for_the_architecture(hf_config, expected: list[str]) -> None:
    assert default_target_modules(hf_config.model_type) == expected
    model = AutoModelForCausalLM.from_config(hf_config)
    adapted = {name.split(".")[-1] for name, module in model.named_modules() if name.split(".")[-1] in expected}
    settings = causal_lora_config(
        config_from_dict({"model": {"task": "causal_lm", "name": "tiny-llama"}}).model, hf_config.model_type
    )
    assert sorted(settings.target_modules) == sorted(expected) and adapted == set(expected)
    assert settings.task_type == "CAUSAL_LM"
    assert settings.fan_in_fan_out == (hf_config.model_type == "gpt2")  # Conv1D weights are stored transposed


def test_the_built_models_carry_adapters_on_the_default_modules_and_only_factors_train() -> None:
    for name, module in (("tiny-llama", "q_proj"), ("tiny-gpt2", "c_attn")):
        config = causal_config(f"model.name={name!r}")
        model = build_causal_lora_model(config.model, config.seed)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
        state = LoraState.from_model(model)
        assert not state.head and all(layer.endswith(module) or layer.endswith("v_proj") for layer in state.factors)


def test_an_architecture_peft_has_no_default_for_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match="model.target_modules: peft has no default"):
        default_target_modules("no-such-architecture")


# --- rendering and labels -------------------------------------------------------------------
def test_alpaca_prompts_name_the_instruction_and_the_input_only_when_there_is_one() -> None:
    tokenizer = tiny_tokenizer()
    prompt, response = render(tokenizer, ALPACA)
    assert (
        prompt == "### Instruction:\nWhat is the topic of this text?\n\n### Input:\na story about elections.\n\n### Response:\n"
    )
    assert response == "politics"
    no_input, _ = render(tokenizer, InstructionExample(response="x", instruction="Say hello."))
    assert "### Input" not in no_input and no_input.endswith("### Response:\n")


def test_chat_prompts_are_rendered_with_the_tokenizer_s_own_chat_template() -> None:
    tokenizer = tiny_tokenizer()
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE  # the tiny tokenizer has one set
    prompt, response = render(tokenizer, CHAT)
    assert prompt == "system: you are a helpful assistant\nuser: say in one word what this is about\nassistant: "
    assert response == "sports\n"
    # Another template (ChatML-like), set on the tokenizer, is the one used: markers and all.
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    prompt, response = render(tokenizer, CHAT)
    assert prompt.endswith("<|im_start|>assistant\n") and prompt.startswith("<|im_start|>system\n")
    assert response == "sports<|im_end|>\n"


def test_prompt_tokens_carry_no_label_and_the_response_ends_with_eos() -> None:
    tokenizer = tiny_tokenizer()
    encoded = encode_instructions(tokenizer, [ALPACA, CHAT], max_length=64)
    for row, example in enumerate((ALPACA, CHAT)):
        prompt_length = int(encoded.prompt_lengths[row])
        length = int(encoded.attention_mask[row].sum())
        labels = encoded.labels[row]
        assert (labels[:prompt_length] == IGNORE_INDEX).all() and (labels[length:] == IGNORE_INDEX).all()
        response = labels[prompt_length:length]
        assert torch.equal(response, encoded.input_ids[row, prompt_length:length])
        assert response[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(response, skip_special_tokens=True).strip() == example.response
    assert encoded.responses(torch.tensor([0])) == [tokenizer(["politics"], add_special_tokens=False)["input_ids"][0] + [2]]


def test_only_response_tokens_reach_the_loss_with_and_without_dp() -> None:
    """The model's own (non-DP) loss and the per-sequence loss of DP-SGD both ignore the prompt."""
    config = causal_config()
    model = build_causal_lora_model(config.model, config.seed).eval()
    encoded = encode_instructions(tiny_tokenizer(), [ALPACA, CHAT], max_length=64)
    batch = encoded.batch(torch.arange(2))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.detach().requires_grad_(True)
    losses = sequence_losses(logits, batch["labels"])
    losses.sum().backward()
    for row in range(2):
        prompt_length = int(encoded.prompt_lengths[row])
        # Position t predicts token t + 1: logits before the last prompt position get no gradient.
        assert not logits.grad[row, : prompt_length - 1].any()
        assert logits.grad[row, prompt_length - 1].abs().sum() > 0
        targets = batch["labels"][row, prompt_length:]
        targets = targets[targets != IGNORE_INDEX]
        by_hand = torch.nn.functional.cross_entropy(logits[row, prompt_length - 1 : prompt_length - 1 + len(targets)], targets)
        assert losses[row].item() == pytest.approx(by_hand.item(), rel=1e-5)
    # Without DP the model's own loss: the token mean over the batch's response tokens.
    own = model(**batch).loss.item()
    shifted_labels = batch["labels"][:, 1:]
    every = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), shifted_labels.reshape(-1), ignore_index=IGNORE_INDEX
    )
    assert own == pytest.approx(every.item(), rel=1e-5)


def test_a_long_example_keeps_its_answer_and_loses_prompt_tokens_first() -> None:
    tokenizer = tiny_tokenizer()
    long = InstructionExample(response="travel and food", instruction="What is the topic of this text? " * 10, input="beaches")
    encoded = encode_instructions(tokenizer, [long], max_length=24)
    assert int(encoded.attention_mask[0].sum()) == 24
    response = encoded.responses(torch.tensor([0]))[0]
    assert tokenizer.decode(response, skip_special_tokens=True) == "travel and food"


# --- the built-in task and its scores -------------------------------------------------------
def test_the_builtin_task_is_seeded_balanced_and_holds_out_unseen_prompts() -> None:
    task = generate_instruction_task(3, num_train=400, num_test=80)
    assert task == generate_instruction_task(3, num_train=400, num_test=80)
    assert task != generate_instruction_task(4, num_train=400, num_test=80)
    train_prompts = {(e.instruction, e.input) for e in task.train.examples}
    assert not any((e.instruction, e.input) in train_prompts for e in task.test.examples)
    assert [task.train.categories.count(c) for c in range(8)] == [50] * 8
    assert all(e.response == task.category_names[c] for e, c in zip(task.train.examples, task.train.categories))
    tokenizer = tiny_tokenizer()
    encoded = encode_instructions(tokenizer, task.train.examples + task.test.examples, max_length=64)
    assert not (encoded.input_ids == tokenizer.unk_token_id).any()  # the tokenizer knows every word of the task


def test_a_generation_matches_only_when_it_stops_and_reads_as_the_reference() -> None:
    tokenizer = tiny_tokenizer()
    word, eos = tokenizer.convert_tokens_to_ids("politics"), tokenizer.eos_token_id
    other = tokenizer.convert_tokens_to_ids("sports")
    assert is_exact_match([word, eos], [word, eos], tokenizer)
    assert not is_exact_match([word, word], [word, eos], tokenizer)  # never stopped
    assert not is_exact_match([other, eos], [word, eos], tokenizer)
    assert not is_exact_match([eos], [word, eos], tokenizer)


def test_held_out_scores_are_exact_match_token_loss_and_its_perplexity() -> None:
    config = causal_config("data.exact_match_examples=8")
    test = workspace.test_examples(config)
    model = build_causal_lora_model(config.model, config.seed)
    scores = evaluate(config, model, test, workspace.tokenizer(config))
    assert scores.perplexity == pytest.approx(torch.tensor(scores.loss).exp().item(), rel=1e-6)
    assert 0.0 <= scores.accuracy <= 1.0 and scores.loss > 0


# --- layer shapes: GPT-2's fused, transposed c_attn -----------------------------------------
def test_fedsvd_refactorization_of_gpt2_s_fused_attention_keeps_the_model_s_outputs() -> None:
    config = causal_config("model.name='tiny-gpt2'")
    model = build_causal_lora_model(config.model, config.seed).eval()
    state = LoraState.from_model(model)
    generator = torch.Generator().manual_seed(0)
    for parts in state.factors.values():  # a trained-looking B (peft starts it at zero)
        parts["B"] = torch.randn(parts["B"].shape, generator=generator) * 0.1
    state.load_into(model)
    ids = torch.randint(3, 100, (2, 10), generator=generator)
    before = model(input_ids=ids).logits
    for parts in state.factors.values():
        assert parts["B"].shape[0] == 3 * parts["A"].shape[1]  # q, k and v in one d_out
        parts["B"], parts["A"] = refactorize(parts["B"], parts["A"])
    state.load_into(model)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_local_training_changes_the_factors_it_is_asked_to_train(name: str) -> None:
    config = causal_config(f"model.name={name!r}")
    model = build_causal_lora_model(config.model, config.seed)
    before = LoraState.from_model(model)
    result = train_local(model, workspace.client_examples(config, 0), TrainPlan("B", False, 2, 1e-2, 8, 0))
    for layer, parts in result.state.factors.items():
        assert torch.equal(parts["A"], before.factors[layer]["A"]) and not torch.equal(parts["B"], before.factors[layer]["B"])


def test_bfloat16_base_weights_keep_float32_adapters() -> None:
    config = causal_config("model.dtype='bfloat16'")
    model = build_causal_lora_model(config.model, config.seed)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert {t.dtype for t in LoraState.from_model(model).tensors().values()} == {torch.float32}


# --- config rules ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("model.train_head=true",), "train_head: a causal LM has no classification head"),
        (("model.name='tiny'",), "'tiny' is a classifier"),
        (("attack.name='label_flip'", "attack.fraction=0.3"), "label_flip flips class labels"),
        (("model.gradient_checkpointing=true", "privacy.enabled=true"), "gradient_checkpointing: not with DP-SGD"),
    ],
)
def test_causal_settings_that_cannot_work_are_refused_in_one_line(overrides: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        causal_config(*overrides)
    assert "\n" not in str(raised.value)


def test_causal_defaults_no_head_ghost_clipping_and_peft_s_modules() -> None:
    config = causal_config()
    assert config.model.train_head is False and config.model.target_modules is None
    assert config.privacy.grad_sample_mode == "ghost"
    assert causal_config("privacy.grad_sample_mode='hooks'").privacy.grad_sample_mode == "hooks"
    classification = config_from_dict({})
    assert classification.model.target_modules == ["query", "value"] and classification.privacy.grad_sample_mode == "hooks"
    with pytest.raises(ConfigError, match="is a causal LM; set model.task"):
        config_from_dict({"model": {"name": "tiny-llama"}})


def test_4bit_base_weights_are_refused_in_one_line_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from fedlora.simulation import check_runnable

    with pytest.raises(ConfigError, match="model.load_in_4bit: 4-bit base weights .* need a CUDA device"):
        check_runnable(causal_config("model.load_in_4bit=true"))


def test_the_scenario_configs_parse() -> None:
    tiny = load_config("simulations/instruct_tiny.toml")
    assert tiny.model.causal and tiny.model.name == "tiny-llama" and tiny.data.source == "builtin"
    real = load_config("simulations/instruct_llama.toml")
    assert real.model.causal and real.model.name == "meta-llama/Llama-3.2-1B-Instruct" and real.model.target_modules is None
    assert real.data.hf_dataset_id == "vicgalle/alpaca-gpt4" and real.model.dtype == "bfloat16"
