"""Reward functions for the rl stage: a plain name → function dict, like TRL's reward registry.

Every reward has TRL's signature, `f(completions, **columns) -> list[float | None]`, and is pure,
except `spike_energy`, which needs the policy and is built by `build_rewards` with it.

    REWARDS      name → function: arith_exact, arith_digits, math_answer, reasoning_gym, format, length_penalty
    FACTORIES    name → maker taking the recipe's arguments (`{format: {pattern: "..."}}`)
    build_rewards(spec, policy=, tokenizer=) -> (functions, weights): what GRPO / RLOO / PPO take
    score(functions, weights, prompts, completions, ...) -> (per reward [N, F], weighted sum [N])

A recipe lists rewards with weights (TRL's `reward_weights`), in any of these forms:

    rewards: [arith_exact, {spike_energy: 0.05}]               # name (weight 1) or {name: weight}
    rewards: {arith_exact: 1.0, length_penalty: 0.1}
    rewards: [{format: {weight: 0.5, pattern: "^\\\\d+$"}}]      # arguments for the factory
    rewards: [my_package.my_rewards.brevity]                   # a dotted path to your own function

Names, weights and factory arguments are checked, and dotted paths imported, when the recipe is
loaded (`parse_spec`, called by the rl stage's Config), so a mistake fails before any stage runs.

Each function is wrapped by `checked`: a reward that raises, or returns the wrong number of
values or a non-number, fails with an error naming it.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .energy import SpikeEnergy, spikes_per_completion_token
from .tasks import (
    arith_digits,
    arith_exact,
    extract_number,
    format,
    format_reward,
    length_penalty,
    length_penalty_reward,
    math_answer,
    reasoning_gym,
)

RewardFunc = Callable[..., list]

REWARDS: dict[str, RewardFunc] = {
    "arith_exact": arith_exact,
    "arith_digits": arith_digits,
    "math_answer": math_answer,
    "format": format,
    "length_penalty": length_penalty,
    "reasoning_gym": reasoning_gym,
}

# rewards that take arguments from the recipe; spike_energy is built with the policy (build_rewards)
FACTORIES: dict[str, Callable[..., RewardFunc]] = {
    "format": format_reward,
    "length_penalty": length_penalty_reward,
}

NEEDS_POLICY = ("spike_energy",)


class RewardError(RuntimeError):
    """A reward function failed or broke its contract; the message names the reward."""


def checked(func: RewardFunc, name: str) -> RewardFunc:
    """`func` with its output checked: one float (or None) per completion, else an error naming `name`.

    >>> ok = checked(lambda completions, **kw: [1.0] * len(completions), "ones")
    >>> ok(completions=["a", "b"]), ok.__name__
    ([1.0, 1.0], 'ones')
    >>> checked(lambda completions, **kw: [1.0], "short")(completions=["a", "b"])
    Traceback (most recent call last):
    ...
    rewards.RewardError: reward 'short' returned 1 values for 2 completions (it must return one per completion)
    """

    def reward(*args, **kwargs):
        completions = kwargs.get("completions", args[0] if args else None)
        try:
            values = func(*args, **kwargs)
        except RewardError:
            raise
        except Exception as error:
            raise RewardError(f"reward '{name}' raised {type(error).__name__}: {error}") from error
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise RewardError(f"reward '{name}' returned {type(values).__name__}, expected a list of float | None")
        if completions is not None and len(values) != len(completions):
            raise RewardError(
                f"reward '{name}' returned {len(values)} values for {len(completions)} completions "
                "(it must return one per completion)"
            )
        out: list[float | None] = []
        for i, value in enumerate(values):
            if value is None:
                out.append(None)
            elif isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value)):
                out.append(float(value))
            else:
                raise RewardError(f"reward '{name}' returned {value!r} for completion {i}: expected a finite float or None")
        return out

    reward.__name__ = reward.__qualname__ = name
    reward.__wrapped__ = func
    return reward


def load_dotted(path: str) -> RewardFunc:
    """`package.module.function` → the function (a user's own reward)."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"reward '{path}': not a known reward ({', '.join(known_names())}) nor a dotted path module.function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"reward '{path}': cannot import module '{module_name}': {error}") from None
    func = getattr(module, attr, None)
    if not callable(func):
        raise ValueError(f"reward '{path}': module '{module_name}' has no callable '{attr}'")
    return func


def known_names() -> list[str]:
    return sorted({*REWARDS, *FACTORIES, *NEEDS_POLICY})


def parse_spec(spec: str | Mapping | Sequence) -> list[tuple[str, float, dict[str, Any]]]:
    """The recipe's `rewards:` value → [(name, weight, factory arguments)], in order.

    >>> parse_spec(["arith_exact", {"spike_energy": 0.05}])
    [('arith_exact', 1.0, {}), ('spike_energy', 0.05, {})]
    >>> parse_spec({"format": {"weight": 0.5, "pattern": "^x$"}})
    [('format', 0.5, {'pattern': '^x$'})]
    """
    items = [spec] if isinstance(spec, (str, Mapping)) else list(spec)
    parsed: list[tuple[str, float, dict[str, Any]]] = []
    for item in items:
        if isinstance(item, str):
            parsed.append((item, 1.0, {}))
            continue
        if not isinstance(item, Mapping):
            raise ValueError(f"rewards: {item!r} is neither a name nor a {{name: weight}} mapping")
        for name, value in item.items():
            if isinstance(value, Mapping):
                arguments = dict(value)
                weight = arguments.pop("weight", 1.0)
            else:
                weight, arguments = value, {}
            if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
                raise ValueError(f"rewards.{name}: weight must be a number, got {weight!r}")
            parsed.append((str(name), float(weight), arguments))
    if not parsed:
        raise ValueError("rewards: the list is empty (give at least one reward, e.g. [arith_exact])")
    names = [name for name, _, _ in parsed]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"rewards: {', '.join(duplicates)} listed twice (give each reward once, with one weight)")
    for name, _, arguments in parsed:
        if "." not in name and name not in (*REWARDS, *FACTORIES, *NEEDS_POLICY):
            raise ValueError(f"rewards.{name}: unknown reward (known: {', '.join(known_names())}; or a dotted path module.function)")
        if arguments and name not in FACTORIES and name not in NEEDS_POLICY:
            raise ValueError(f"rewards.{name}: takes no arguments (got {sorted(arguments)}); only a weight")
        if arguments and name in FACTORIES:  # caught with the recipe, not at the rl stage's first step
            try:
                inspect.signature(FACTORIES[name]).bind(**arguments)
            except TypeError as error:
                raise ValueError(f"rewards.{name}: bad arguments {sorted(arguments)}: {error}") from None
        if "." in name and name not in REWARDS:
            load_dotted(name)  # a user's own reward: importable now, so a typo fails before any stage runs
    return parsed


def build_rewards(spec, policy=None, tokenizer=None) -> tuple[list[RewardFunc], list[float]]:
    """Functions (each wrapped by `checked`) and weights for the recipe's `rewards:` value.

    `spike_energy` is built here with the policy and its tokenizer (arguments: batch_size).
    """
    functions, weights = [], []
    for name, weight, arguments in parse_spec(spec):
        if name == "spike_energy":
            if policy is None or tokenizer is None:
                raise ValueError("rewards.spike_energy: needs the policy and its tokenizer (build_rewards(policy=, tokenizer=))")
            func = SpikeEnergy(policy, tokenizer, **arguments)
        elif arguments:
            try:
                func = FACTORIES[name](**arguments)
            except TypeError as error:
                raise ValueError(f"rewards.{name}: bad arguments {sorted(arguments)}: {error}") from None
        elif name in REWARDS:
            func = REWARDS[name]
        else:
            func = load_dotted(name)
        functions.append(checked(func, name))
        weights.append(weight)
    return functions, weights


def score(
    reward_funcs: Sequence[RewardFunc],
    reward_weights: Sequence[float],
    prompts: Sequence[str],
    completions: Sequence[str],
    columns: Mapping[str, Sequence] | None = None,
    completion_ids: Sequence[Sequence[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Call every reward as TRL does and combine them: (per reward [N, F] with NaN for None, total [N]).

    total = Σ_f weight_f · reward_f, a None counting 0 (TRL's `nansum` convention). `columns` are
    the dataset's other columns, one value per completion; `completion_ids` the sampled token ids.

    >>> per, total = score([lambda completions, **kw: [1.0, None]], [0.5], ["a", "b"], ["x", "y"])
    >>> total.tolist()
    [0.5, 0.0]
    """
    kwargs = dict(columns or {})
    if completion_ids is not None:
        kwargs["completion_ids"] = completion_ids
    per_func = torch.zeros(len(completions), len(reward_funcs))
    for i, func in enumerate(reward_funcs):
        values = func(prompts=list(prompts), completions=list(completions), **kwargs)
        per_func[:, i] = torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)
    total = (per_func * torch.tensor(list(reward_weights), dtype=torch.float32)).nansum(dim=1)
    return per_func, total


__all__ = [
    "FACTORIES",
    "NEEDS_POLICY",
    "REWARDS",
    "RewardError",
    "SpikeEnergy",
    "arith_exact",
    "build_rewards",
    "checked",
    "extract_number",
    "format",
    "format_reward",
    "length_penalty",
    "length_penalty_reward",
    "load_dotted",
    "math_answer",
    "parse_spec",
    "reasoning_gym",
    "score",
    "spikes_per_completion_token",
]
