"""Task rewards: pure functions with TRL's reward signature.

    def reward(completions: list[str], **columns) -> list[float | None]

`completions` are the decoded completions (text, cut at EOS); every dataset column arrives as a
keyword argument of the same name (`answer=[...]`), one value per completion; TRL also passes
`prompts`, `completion_ids`, `trainer_state`, … which a reward may ignore (`**kwargs`). `None` means
"does not apply to this completion" (TRL counts it as NaN and leaves it out of the weighted sum).

    >>> arith_exact(["85", " 12"], answer=["85", "13"])
    [1.0, 0.0]
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_GSM8K_FINAL = re.compile(r"####\s*(-?\d[\d,]*(?:\.\d+)?)")

DEFAULT_FORMAT_PATTERN = r"^\s*-?\d+\s*$"  # the whole completion is one integer (the arithmetic task)


def arith_exact(completions: Sequence[str], answer: Sequence[str | None], **kwargs) -> list[float | None]:
    """1.0 when the completion, stripped, equals the reference answer, stripped; else 0.0.

    The exact-match rule of the built-in arithmetic task (stages.tasks.is_exact_match), so the
    reward and the stage's held-out accuracy agree. A row without an answer gets None.

    >>> arith_exact(["85", "85 ", "86", "8"], answer=["85", "85", "85", None])
    [1.0, 1.0, 0.0, None]
    """
    return [None if ref is None else float(str(text).strip() == str(ref).strip()) for text, ref in zip(completions, answer)]


def arith_digits(completions: Sequence[str], answer: Sequence[str | None], **kwargs) -> list[float | None]:
    """Partial credit: the fraction of the answer's digit places the completion gets right, places
    aligned from the units (the place a carry starts from), divided by the longer of the two.

    Exact match scores 1.0 (as arith_exact); a completion that is not an unsigned integer 0.0.
    Why: with exact match alone, a GRPO group of a problem the policy never solves is all 0 and
    one it always solves all 1, so neither moves the policy; the places give the unsolved ones a
    gradient. A row without an answer gets None.

    >>> arith_digits(["1089", "1079", "89", "x", "1089"], answer=["1089", "1089", "1089", "1089", None])
    [1.0, 0.75, 0.5, 0.0, None]
    """
    scores: list[float | None] = []
    for text, ref in zip(completions, answer):
        if ref is None:
            scores.append(None)
            continue
        got, want = str(text).strip(), str(ref).strip()
        if not got.isdigit() or not want.isdigit():
            scores.append(float(got == want))
            continue
        right = sum(a == b for a, b in zip(reversed(got), reversed(want)))
        scores.append(right / max(len(got), len(want)))
    return scores


def extract_number(text: str) -> float | None:
    """The final answer of a free-text solution: GSM8K's `#### 42` if present, else the last number.

    Thousands separators are dropped; None when the text holds no number.

    >>> extract_number("She has 3 + 4 = 7 apples.\\n#### 1,204")
    1204.0
    >>> extract_number("so the total is 12, not 13.5")
    13.5
    >>> extract_number("no digits") is None
    True
    """
    final = _GSM8K_FINAL.search(text)
    if final:
        found = final.group(1)
    else:
        numbers = _NUMBER.findall(text)
        if not numbers:
            return None
        found = numbers[-1]
    try:
        return float(found.replace(",", "").rstrip("."))
    except ValueError:
        return None


def math_answer(completions: Sequence[str], answer: Sequence[str | float | None], **kwargs) -> list[float | None]:
    """1.0 when the number extracted from the completion equals the reference number; else 0.0.

    Both sides go through `extract_number` (a GSM8K answer column `"... #### 42"` works as is); a
    reference with no number gives None (the reward does not apply), a completion with none 0.0.

    >>> math_answer(["The answer is 42.", "#### 41", "I don't know"], answer=["#### 42", "42", "42"])
    [1.0, 0.0, 0.0]
    """
    rewards: list[float | None] = []
    for text, ref in zip(completions, answer):
        target = None if ref is None else (float(ref) if isinstance(ref, (int, float)) else extract_number(str(ref)))
        if target is None:
            rewards.append(None)
            continue
        got = extract_number(str(text))
        rewards.append(float(got is not None and abs(got - target) <= 1e-6 * max(1.0, abs(target))))
    return rewards


def format(completions: Sequence[str], pattern: str | Sequence[str] = DEFAULT_FORMAT_PATTERN, **kwargs) -> list[float | None]:  # noqa: A001 - the reward's public name
    """1.0 when the completion matches the regex `pattern` (re.search); else 0.0.

    The default pattern accepts a completion that is one integer. `pattern` may be one regex or a
    dataset column of them (one per row); `format_reward(pattern)` makes a fixed-pattern reward.

    >>> format(["42", "42 apples", " -7 "])
    [1.0, 0.0, 1.0]
    >>> format(["<answer>3</answer>", "3"], pattern=r"^<answer>.*</answer>$")
    [1.0, 0.0]
    """
    patterns = [pattern] * len(completions) if isinstance(pattern, str) else list(pattern)
    return [float(re.search(p, str(text)) is not None) for text, p in zip(completions, patterns)]


def format_reward(pattern: str) -> Callable[..., list[float | None]]:
    """A `format` reward with a fixed regex (the recipe's `{format: {pattern: ...}}`).

    >>> think = format_reward(r"^<think>.*</think>")
    >>> think(["<think>1+1</think>2", "2"]), think.__name__
    ([1.0, 0.0], 'format')
    """
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ValueError(f"format reward: invalid regex {pattern!r}: {error}") from None

    def format(completions, **kwargs):  # noqa: A001 - TRL logs the reward under its __name__
        return [float(compiled.search(str(text)) is not None) for text in completions]

    return format


def length_penalty(completions: Sequence[str], max_chars: int = 32, **kwargs) -> list[float | None]:
    """-len(completion) / max_chars, capped at -1: shorter completions cost less.

    Characters, not tokens, so the reward needs no tokenizer and means the same across models.
    Use it with a small weight next to a task reward (`{length_penalty: 0.1}`).

    >>> length_penalty(["", "12", "x" * 40], max_chars=4)
    [0.0, -0.5, -1.0]
    """
    if max_chars < 1:
        raise ValueError(f"length_penalty: max_chars must be >= 1, got {max_chars}")
    return [-min(len(str(text)), max_chars) / max_chars for text in completions]


def length_penalty_reward(max_chars: int = 32) -> Callable[..., list[float | None]]:
    """A `length_penalty` with its own `max_chars` (the recipe's `{length_penalty: {max_chars: 16}}`).

    >>> length_penalty_reward(max_chars=2)(["1", "123"])
    [-0.5, -1.0]
    """
    if max_chars < 1:
        raise ValueError(f"length_penalty: max_chars must be >= 1, got {max_chars}")

    def length_penalty(completions, **kwargs):
        return [-min(len(str(text)), max_chars) / max_chars for text in completions]

    return length_penalty


def reasoning_gym(completions: Sequence[str], rg_entry: Sequence[str | None] | None = None, **kwargs) -> list[float | None]:
    """The reasoning-gym task's own scorer, 0..1: `score_answer(completion, entry)` of the dataset
    that made the problem (its name is in the entry's metadata). `rg_entry` is the problem's JSON,
    the column the data stage's `reasoning_gym` source writes; the completion is stripped and cut at
    its first line (the answer format the prompts ask for). A row without an entry gets None, and so
    does every row of a dataset without the column (the reward does not apply there).

    >>> import json
    >>> entry = json.dumps({"question": "4 - 1 =", "answer": "3", "metadata": {"source_dataset": "chain_sum"}})
    >>> reasoning_gym(["3", " 3\\nmore", "4"], rg_entry=[entry, entry, entry])
    [1.0, 1.0, 0.0]
    """
    import json

    import reasoning_gym as rg  # a dependency; imported here so the other rewards load without it

    if rg_entry is None:
        return [None] * len(completions)
    scores: list[float | None] = []
    for text, raw in zip(completions, rg_entry):
        if raw is None:
            scores.append(None)
            continue
        entry = json.loads(raw)
        answer = str(text).strip().split("\n", 1)[0].strip()
        scores.append(float(rg.get_score_answer_fn(entry["metadata"]["source_dataset"])(answer, entry)))
    return scores
