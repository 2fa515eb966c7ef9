"""Task metrics: answer comparison, greedy exact match through model.generate, perplexity."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from transformers import MambaConfig, MambaForCausalLM

from stages import tasks
from stages.data import ARITHMETIC_ALPHABET, build_char_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer(ARITHMETIC_ALPHABET)


def tiny_mamba(tokenizer, hidden: int = 32, layers: int = 1, seed: int = 0) -> MambaForCausalLM:
    torch.manual_seed(seed)
    config = MambaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, state_size=8,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return MambaForCausalLM(config)


def test_answer_comparison_on_known_completions():
    assert tasks.is_exact_match(" 85\n", "85")
    assert tasks.is_exact_match("85", " 85 ")
    assert not tasks.is_exact_match("850", "85")
    assert not tasks.is_exact_match("8 5", "85")
    assert not tasks.is_exact_match("", "85")
    assert tasks.cut_at_eos([5, 6, 2, 7, 2], eos_token_id=2) == [5, 6]
    assert tasks.cut_at_eos([5, 6, 7], eos_token_id=2) == [5, 6, 7]
    assert tasks.cut_at_eos([5, 9, 6], eos_token_id=[9, 2]) == [5]
    assert tasks.cut_at_eos([2, 5], eos_token_id=2) == []


def test_answer_token_budget(tokenizer):
    assert tasks.answer_token_budget(tokenizer, ["7", "1234", "56"]) == 4 + 2


def test_untrained_model_accuracy_is_a_fraction(tokenizer):
    model = tiny_mamba(tokenizer)
    prompts = Dataset.from_dict({"prompt": ["1+2=", "37+48=", "5+5="], "answer": ["3", "85", "10"]})
    result = tasks.exact_match_accuracy(model, tokenizer, prompts, max_new_tokens=4, batch_size=2)
    assert result["n"] == 3 and 0.0 <= result["accuracy"] <= 1.0
    assert [row[0] for row in result["examples"]] == ["1+2=", "37+48=", "5+5="]
    assert model.training  # the caller's mode is restored
    assert tokenizer.padding_side == "left"
    assert tasks.exact_match_accuracy(model, tokenizer, prompts, max_new_tokens=4, limit=2)["n"] == 2
    with pytest.raises(ValueError, match="no column 'answer'"):
        tasks.exact_match_accuracy(model, tokenizer, prompts.remove_columns("answer"))


def test_memorised_answers_score_one_with_left_padding(tokenizer):
    # Teach a tiny Mamba two problems of different lengths; batched greedy decoding (the short prompt
    # left-padded) must then return exactly the memorised answers, and wrong references score 0.
    model = tiny_mamba(tokenizer, hidden=32, layers=2)
    pairs = [("1+1=", "2"), ("12+30=", "42")]
    sequences = []
    for prompt, answer in pairs:
        ids = torch.tensor([tokenizer(prompt + answer)["input_ids"] + [tokenizer.eos_token_id]])
        labels = ids.clone()
        labels[:, : len(prompt)] = -100  # learn the answer and EOS only (HF shifts labels by one)
        sequences.append((ids, labels))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        for ids, labels in sequences:
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    assert loss.item() < 0.05
    right = Dataset.from_dict({"prompt": ["1+1=", "12+30="], "answer": ["2", "42"]})
    wrong = Dataset.from_dict({"prompt": ["1+1=", "12+30="], "answer": ["3", "41"]})
    completions = tasks.generate_completions(model, tokenizer, right["prompt"], max_new_tokens=5, batch_size=2)
    print("completions:", completions)
    assert completions == ["2", "42"]  # cut at EOS, nothing after it
    assert tasks.exact_match_accuracy(model, tokenizer, right, max_new_tokens=5)["accuracy"] == 1.0
    assert tasks.exact_match_accuracy(model, tokenizer, wrong, max_new_tokens=5)["accuracy"] == 0.0


def test_perplexity_of_uniform_logits_is_the_vocab_size(tokenizer):
    # zero (tied) embeddings give all-zero logits: every next token has probability 1/V
    model = tiny_mamba(tokenizer)
    with torch.no_grad():
        model.get_input_embeddings().weight.zero_()
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    blocks = Dataset.from_dict({"input_ids": torch.randint(0, len(tokenizer), (5, 12)).tolist()})
    ppl = tasks.perplexity(model, blocks, batch_size=2)
    assert ppl == pytest.approx(len(tokenizer), rel=1e-5)


def test_perplexity_matches_the_models_own_loss(tokenizer):
    model = tiny_mamba(tokenizer, seed=1)
    ids = torch.randint(0, len(tokenizer), (4, 10))
    blocks = Dataset.from_dict({"input_ids": ids.tolist()})
    with torch.no_grad():
        expected = math.exp(model(input_ids=ids, labels=ids).loss.item())  # HF shifts labels itself
    # batch size 3 splits the blocks unevenly: the mean must still be over tokens
    assert tasks.perplexity(model, blocks, batch_size=3) == pytest.approx(expected, rel=1e-4)
    assert tasks.perplexity(model, blocks, limit=1) == pytest.approx(
        math.exp(model(input_ids=ids[:1], labels=ids[:1]).loss.item()), rel=1e-4
    )
