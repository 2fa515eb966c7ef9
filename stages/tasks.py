"""Task metrics shared by the teacher, distill, sparsify, rl and eval stages.

* `exact_match_accuracy`: greedy-decode each prompt of a `prompt, answer` dataset (the data
  stage's `prompts/` splits) and count completions equal to the reference answer.
* `perplexity`: exp of the token-averaged next-token loss over packed `input_ids` blocks (the data
  stage's `corpus/` splits).

Both take any causal LM with the HF API (`model(input_ids, attention_mask).logits`,
`model.generate`): transformers' `MambaForCausalLM` and the project's spiking model alike.
* `compare_with_teacher`: both plus firing rates and energy, a trained student beside its teacher.
* `left_padded`, `eval_mode`: a tokenizer padding on the left / a model in eval mode for the duration.
* `bootstrap_ci`: the 95% percentile-bootstrap interval of a mean of per-example scores, or of a
  paired difference (the same problems scored by two models).

    from stages.tasks import exact_match_accuracy
    exact_match_accuracy(model, tokenizer, load_from_disk("runs/tiny/data/prompts")["test"])
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

import spiking


# The lm-eval tasks the data stage writes from its held-out documents (`stages.data.lastword_passages`)
LASTWORD_TASKS = ("heldout_lastword_mc", "heldout_lastword_gen")


def normalize_answer(text: str) -> str:
    """What two answers are compared on: surrounding whitespace does not count."""
    return text.strip()


def is_exact_match(completion: str, answer: str) -> bool:
    """True when the completion, stripped, equals the reference answer, stripped."""
    return normalize_answer(completion) == normalize_answer(answer)


def cut_at_eos(token_ids: Sequence[int], eos_token_id: int | Sequence[int] | None) -> list[int]:
    """The generated ids up to (not including) the first EOS: what comes after is not the answer."""
    eos_ids = set() if eos_token_id is None else (
        {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    )
    out = []
    for token_id in token_ids:
        if token_id in eos_ids:
            break
        out.append(int(token_id))
    return out


def answer_token_budget(tokenizer, answers: Sequence[str], slack: int = 2) -> int:
    """Enough new tokens for the longest reference answer, plus `slack` (room for EOS)."""
    longest = max((len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers), default=0)
    return longest + slack


@contextmanager
def left_padded(tokenizer) -> Iterator:
    """`tokenizer` pads on the left inside the block (its own side restored after).

    Batched prompts must be left-padded so every row's last prompt token sits at the same
    position and new tokens follow it directly (the Mamba ignores padded positions via the mask).
    """
    saved_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield tokenizer
    finally:
        tokenizer.padding_side = saved_side


@contextmanager
def eval_mode(model):
    """Eval mode for the duration (no dropout), the caller's mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def generate_completions(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 8, batch_size: int = 64
) -> list[str]:
    """Greedy completions of `prompts`, decoded without special tokens, cut at the first EOS.

    Prompts are left-padded, so every row's last prompt token sits at the same position and the
    new tokens follow it directly (a Mamba ignores the padded positions through the attention mask).
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token: set one (e.g. pad_token = eos_token) before generating")
    eos_token_id = tokenizer.eos_token_id
    completions: list[str] = []
    with left_padded(tokenizer), eval_mode(model):
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)
            batch = {key: value.to(model.device) for key, value in batch.items()}
            generated = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos_token_id,
                synced_gpus=False,  # evaluation runs on one rank: never wait for the others per token
            )
            new_tokens = generated[:, batch["input_ids"].shape[1] :]  # [B, <= max_new_tokens]
            for row in new_tokens.tolist():
                ids = cut_at_eos(row, eos_token_id)
                completions.append(tokenizer.decode(ids, skip_special_tokens=True))
    return completions


def exact_match_accuracy(
    model,
    tokenizer,
    prompts_ds,
    max_new_tokens: int = 8,
    batch_size: int = 64,
    limit: int | None = None,
) -> dict:
    """Greedy exact-match accuracy on a dataset with columns `prompt` and `answer`.

    limit: score only the first `limit` rows (None = all). Returns
    `{"accuracy": float in [0, 1], "n": rows scored, "examples": first few (prompt, completion, answer)}`.
    """
    for column in ("prompt", "answer"):
        if column not in prompts_ds.column_names:
            raise ValueError(f"prompts dataset has no column '{column}' (columns: {prompts_ds.column_names})")
    if limit is not None:
        prompts_ds = prompts_ds.select(range(min(limit, len(prompts_ds))))
    prompts, answers = prompts_ds["prompt"], prompts_ds["answer"]
    if len(prompts) == 0:
        raise ValueError("prompts dataset is empty: nothing to score")
    completions = generate_completions(model, tokenizer, prompts, max_new_tokens, batch_size)
    correct = [is_exact_match(c, a) for c, a in zip(completions, answers)]
    return {
        "accuracy": sum(correct) / len(correct),
        "n": len(correct),
        "correct": [float(c) for c in correct],  # per prompt, in order: paired comparisons use it
        "examples": [list(x) for x in zip(prompts[:5], completions[:5], answers[:5])],
    }


def bootstrap_ci(
    values: Sequence[float], baseline: Sequence[float] | None = None, iters: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile-bootstrap interval (default 95%) of mean(values), or with `baseline` of the paired
    mean(values − baseline): the same examples resampled for both, so what the two models share
    (easy and hard problems) cancels. Deterministic for a seed.

    >>> bootstrap_ci([1.0] * 10)
    (1.0, 1.0)
    >>> lo, hi = bootstrap_ci([1, 0] * 50); 0.39 < lo < 0.5 < hi < 0.61
    True
    """
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    if baseline is not None:
        b = np.asarray(baseline, dtype=np.float64)
        if b.shape != x.shape:
            raise ValueError(f"bootstrap_ci: {len(b)} paired baseline scores for {len(x)} scores")
        x = x - b
    if x.size == 0:
        raise ValueError("bootstrap_ci: no scores")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(iters, x.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


@torch.no_grad()
def perplexity(model, corpus_ds, batch_size: int = 16, limit: int | None = None) -> float:
    """exp(mean next-token cross-entropy) over all positions of packed `input_ids` blocks [B, L].

    Every block position but the first is predicted from the ones before it (no padding in packed
    blocks); the mean is over tokens, not blocks. limit: the first `limit` blocks (None = all).
    """
    if "input_ids" not in corpus_ds.column_names:
        raise ValueError(f"corpus dataset has no column 'input_ids' (columns: {corpus_ds.column_names})")
    if limit is not None:
        corpus_ds = corpus_ds.select(range(min(limit, len(corpus_ds))))
    if len(corpus_ds) == 0:
        raise ValueError("corpus dataset is empty: no perplexity")
    total_loss, total_tokens = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(corpus_ds), batch_size):
            input_ids = torch.tensor(corpus_ds[start : start + batch_size]["input_ids"], device=model.device)
            logits = model(input_ids=input_ids).logits[:, :-1].float()  # [B, L-1, V]
            targets = input_ids[:, 1:]  # [B, L-1]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            total_loss += loss.item()
            total_tokens += targets.numel()
    return math.exp(total_loss / total_tokens)


@torch.no_grad()
def compare_with_teacher(student, teacher, tokenizer, blocks, test_prompts, budget: int, batch_size: int):
    """A trained student beside its teacher (rank 0, end of distill / sparsify) -> (metrics, student's EnergyReport).

    Greedy accuracy of both on `test_prompts`; perplexity of both, the student's firing rates
    (overall and per placement) and energy per token of both on the same held-out `blocks`
    (`input_ids` [n, L]); energy_ratio = teacher's pJ per token / the student's.
    """
    student.eval()
    input_ids = torch.tensor(blocks["input_ids"], device=student.device)  # [n, L]
    report_t, _ = spiking.measure(teacher, input_ids)
    report_s, stats = spiking.measure(student, input_ids)
    accuracy = {
        name: exact_match_accuracy(model, tokenizer, test_prompts, max_new_tokens=budget, batch_size=batch_size)
        for name, model in (("student", student), ("teacher", teacher))
    }
    metrics = {
        "student_accuracy": accuracy["student"]["accuracy"],
        "teacher_accuracy": accuracy["teacher"]["accuracy"],
        "eval_samples": accuracy["student"]["n"],
        "student_ppl": perplexity(student, blocks, batch_size),
        "teacher_ppl": perplexity(teacher, blocks, batch_size),
        # a student without neurons (distill's `placement: []`, e.g. a dense conversion of a
        # Transformer before sparsify adds them) has no spikes to count: no firing rate
        "firing_rate": stats.firing_rate if stats is not None else None,
        **({f"firing_rate/{p}": d["firing_rate"] for p, d in stats.by_placement().items()} if stats is not None else {}),
        "energy_pj_per_token_teacher": report_t.pj_per_token,
        "energy_pj_per_token_student": report_s.pj_per_token,
        "energy_ratio": report_t.pj_per_token / report_s.pj_per_token,
    }
    return metrics, report_s
