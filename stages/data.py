"""data stage: build the corpus, the RL prompts, optional preference pairs and the tokenizer.

    spikerl run recipes/tiny.yaml --only data

Sources (`stages.data.source`, exactly one kind):

* `{synthetic: arithmetic, digits: [1, 2], operators: ["+"], num_problems: 12000}`: problems like
  `37+48=` → `85`, generated offline, deterministic per seed, no problem in two splits.
* `{hub: <dataset id>, split: train, text_column: text}`: `datasets.load_dataset` (needs the hub).
* `{files: [a.jsonl, b.jsonl], format: jsonl, prompt_column: q, answer_column: a}`: local files.
* `{text_folder: local/text, glob: ["**/*.rst.txt", "**/*.rst.gz"]}`: plain-text documents, one per
  file (`.gz` read transparently), e.g. the Debian documentation `scripts/fetch_text_corpus.sh`
  extracts. Text only: RL / accuracy prompts then come from `prompt_source`.

The examples are deduplicated, then split three ways, without overlap: `test` (held out for every
stage's metrics), `rl` (the RL prompts, held out of the teacher's corpus so RL sees problems the
teacher did not memorise) and the rest, the corpus the teacher and the student train on.

Outputs under `run_dir/data/` (each loads with `datasets.load_from_disk` /
`AutoTokenizer.from_pretrained`):

    corpus/       DatasetDict train/test, column input_ids: packed blocks of seq_len tokens,
                  examples separated by EOS (for LM / KD training and perplexity); with
                  task_in_corpus also `task`, the worked task examples alone, packed once each
                  (a KD stage's `task_share` draws from it)
    prompts/      DatasetDict train/test, columns prompt, answer (TRL-ready: `prompt`)
    preferences/  Dataset prompt, chosen, rejected (only when preference_pairs is set)
    tokenizer/    the tokenizer every later stage uses

The tokenizer is the recipe's `model.tokenizer`, else the pretrained teacher's, else one built
here: character level (WordLevel over single characters) with <pad>, <bos>, <eos>, <unk>; for the
arithmetic generator over the fixed alphabet `0123456789+-*=`, for other sources over the
characters of the data.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from collections.abc import Sequence
from typing import Annotated, Any, Literal, Union

from datasets import Dataset, DatasetDict, concatenate_datasets, load_dataset
from pydantic import Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from stages.context import ModelConfig, StageContext, StrictModel, local_path

GENERATORS = ("arithmetic",)  # names accepted by `source.synthetic`
ARITHMETIC_ALPHABET = "0123456789+-*="
SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>", "unk": "<unk>"}


# ---------------------------------------------------------------------------------------- config


class SyntheticSource(StrictModel):
    """A built-in generator. `arithmetic`: `a<op>b=` → `result`, operands of `digits` digits."""

    synthetic: str = Field("arithmetic", description=f"generator name, one of {list(GENERATORS)}")
    digits: list[int] = Field(
        default_factory=lambda: [2, 3],
        description="digit counts of the operands, one drawn per problem: more digits = harder",
    )
    digit_weights: list[float] | None = Field(
        None, description="share of problems per entry of `digits` (None = equal; default digits: 2:1)"
    )
    operators: list[Literal["+", "-", "*"]] = Field(
        default_factory=lambda: ["+"], description="operators, equal shares; '-' can give negative answers"
    )
    num_problems: int = Field(
        12000, ge=3, description="distinct problems over all splits (test + rl + corpus): more = more to learn from"
    )

    @model_validator(mode="before")
    @classmethod
    def _default_mix(cls, data: Any) -> Any:
        # the default mix is a pair: 2-digit twice as often as 3-digit (recipes/tiny.yaml says why)
        if isinstance(data, dict) and "digits" not in data and "digit_weights" not in data:
            data = {**data, "digit_weights": [2.0, 1.0]}
        return data

    @field_validator("synthetic")
    @classmethod
    def _known_generator(cls, name: str) -> str:
        if name not in GENERATORS:
            raise ValueError(f"unknown generator '{name}' for source.synthetic (known: {list(GENERATORS)})")
        return name

    @field_validator("digits")
    @classmethod
    def _digit_range(cls, digits: list[int]) -> list[int]:
        if not digits or any(not 1 <= d <= 9 for d in digits) or len(set(digits)) != len(digits):
            raise ValueError(f"source.digits must be distinct digit counts in 1..9, got {digits}")
        return digits

    @model_validator(mode="after")
    def _weights_match(self) -> SyntheticSource:
        weights = self.digit_weights
        if weights is not None and (len(weights) != len(self.digits) or any(w < 0 for w in weights) or sum(weights) <= 0):
            raise ValueError(
                f"source.digit_weights must be {len(self.digits)} non-negative numbers (one per digits entry), got {weights}"
            )
        for (digits, operator, size), quota in zip(self.classes(), self.quotas()):
            if quota > size:  # caught with the recipe, not when the data stage runs
                raise ValueError(
                    f"source.num_problems: {quota} problems asked of {digits}-digit '{operator}', which has only {size} "
                    f"distinct problems: lower num_problems or change digits/digit_weights"
                )
        return self

    def classes(self) -> list[tuple[int, str, int]]:
        """(digit count, operator, number of distinct problems) of every problem class."""
        # operands of d digits: 0..9 for d = 1, else 10^(d-1)..10^d - 1; a problem is an ordered pair
        return [(d, op, (10 if d == 1 else 9 * 10 ** (d - 1)) ** 2) for d in self.digits for op in self.operators]

    def quotas(self) -> list[int]:
        """Problems per class: num_problems split by digit_weights, operators equally (largest remainder)."""
        weights = self.digit_weights or [1.0] * len(self.digits)
        shares = [w / len(self.operators) for w in weights for _ in self.operators]
        return _apportion(self.num_problems, [share / sum(shares) for share in shares])


class _TextColumns(StrictModel):
    """Which columns hold what: `text` for the corpus, `prompt` + `answer` for RL and accuracy."""

    text_column: str | None = Field(
        None, description="column with the training text (None: prompt + answer concatenated)"
    )
    prompt_column: str | None = Field(None, description="column with the task prompt (for RL and accuracy)")
    answer_column: str | None = Field(None, description="column with the reference answer")
    max_examples: int | None = Field(None, ge=1, description="use only the first N examples (None = all)")

    @model_validator(mode="after")
    def _some_text(self):
        if (self.prompt_column is None) != (self.answer_column is None):
            raise ValueError("source: set both prompt_column and answer_column, or neither")
        if self.text_column is None and self.prompt_column is None:
            raise ValueError("source: set text_column, or prompt_column and answer_column")
        return self


class HubSource(_TextColumns):
    """A dataset from the Hugging Face hub, through `datasets.load_dataset`."""

    hub: str = Field(description="dataset id, e.g. HuggingFaceFW/fineweb-edu")
    name: str | None = Field(None, description="dataset configuration (subset) name, e.g. sample-10BT")
    split: str = Field("train", description="split to read, slicing allowed (train[:1%])")
    test_split: str | None = Field(None, description="read the test examples from this split (None: carve from `split`)")
    revision: str | None = Field(None, description="dataset revision (commit or tag), for reproducibility")
    streaming: bool = Field(False, description="stream instead of downloading everything; needs max_examples")

    @model_validator(mode="after")
    def _stream_needs_cap(self) -> HubSource:
        if self.streaming and self.max_examples is None:
            raise ValueError(f"source.hub {self.hub}: streaming needs max_examples (how many examples to take)")
        return self


class FilesSource(_TextColumns):
    """Local files in one format, read with `datasets.load_dataset(<format>, data_files=...)`."""

    files: list[str] = Field(description="paths of the data files (relative paths: from the working directory)")
    format: Literal["text", "json", "jsonl", "csv", "parquet"] | None = Field(
        None, description="file format (None: from the first file's extension); text = one example per line"
    )

    @model_validator(mode="before")
    @classmethod
    def _text_files_have_text(cls, data: Any) -> Any:
        # a text file has exactly one column, `text`: make it the default so `{files: [a.txt]}` suffices
        if isinstance(data, dict) and data.get("text_column") is None and data.get("prompt_column") is None:
            fmt = data.get("format") or _format_from_extension(str((data.get("files") or [""])[0]))
            if fmt == "text":
                data = {**data, "text_column": "text"}
        return data


class TextFolderSource(StrictModel):
    """Plain-text documents from a local folder, one document per file, in sorted path order."""

    text_folder: str = local_path(kind="folder", description="folder of text files (relative paths: from the working directory)")
    glob: list[str] = Field(
        default_factory=lambda: ["**/*.txt", "**/*.rst", "**/*.md"],
        description="file patterns under text_folder; a file ending in .gz is decompressed (e.g. **/*.rst.gz)",
    )
    min_chars: int = Field(200, ge=1, description="skip files shorter than this (indexes, stubs): they teach little")
    max_documents: int | None = Field(None, ge=1, description="use only the first N files after sorting (None = all)")
    max_chars: int | None = Field(None, ge=1, description="cut each document after this many characters (None = whole)")


class ReasoningGymSource(StrictModel):
    """Procedural reasoning problems with their own scorers (reasoning-gym): prompt, answer and the
    problem's entry (question, answer, metadata) that its scorer reads, kept as `rg_entry` (JSON)."""

    reasoning_gym: list[str] = Field(description="task names of reasoning_gym.create_dataset, e.g. [chain_sum, basic_arithmetic]")
    config: dict[str, Any] = Field(
        default_factory=dict, description="generator settings for every task, e.g. {min_terms: 2, max_terms: 2, max_digits: 2}"
    )
    size: int = Field(3000, ge=3, description="problems per task over all splits (test + rl + corpus examples)")
    template: str = Field("{question}\nAnswer: ", description="how a problem is posed to the model; the answer follows it")
    seed: int | None = Field(None, ge=0, description="the generators' seed (None: run.seed)")

    @field_validator("reasoning_gym", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, str) else value

    @field_validator("template")
    @classmethod
    def _has_question(cls, value: str) -> str:
        if "{question}" not in value:
            raise ValueError("source.template must contain {question}")
        return value


def _source_kind(value: Any) -> str | None:
    """Which source model a recipe dict is, by its key: synthetic, hub, files, text_folder or reasoning_gym."""
    if isinstance(value, dict):
        kinds = [k for k in ("synthetic", "hub", "files", "text_folder", "reasoning_gym") if k in value]
        if len(kinds) != 1:
            return None
        return kinds[0]
    for kind, cls in (("synthetic", SyntheticSource), ("hub", HubSource), ("files", FilesSource),
                      ("text_folder", TextFolderSource), ("reasoning_gym", ReasoningGymSource)):
        if isinstance(value, cls):
            return kind
    return None


Source = Annotated[
    Union[
        Annotated[SyntheticSource, Tag("synthetic")],
        Annotated[HubSource, Tag("hub")],
        Annotated[FilesSource, Tag("files")],
        Annotated[TextFolderSource, Tag("text_folder")],
        Annotated[ReasoningGymSource, Tag("reasoning_gym")],
    ],
    Discriminator(
        _source_kind,
        custom_error_type="source_kind",
        custom_error_message="a source needs exactly one of the keys synthetic, hub, files, text_folder or reasoning_gym",
    ),
]


class Config(StrictModel):
    """`stages.data:` recipe section."""

    source: Source = Field(default_factory=SyntheticSource, description="where the examples come from")
    prompt_source: Source | None = Field(
        None, description="RL / accuracy prompts from a different source than the corpus (None: from `source`)"
    )
    seq_len: int = Field(24, ge=2, description="tokens per packed corpus block: longer = more context, slower CPU steps")
    test_size: int | float = Field(
        400, gt=0, description="held-out examples: a fraction if < 1, else a count (taken from the prompt source)"
    )
    rl_prompts: int = Field(512, ge=0, description="prompts held out of the corpus for RL (prompts/train)")
    preference_pairs: bool | int = Field(
        False, description="(prompt, chosen, rejected) pairs for DPO: false/0 none, true = one per RL prompt, N = N pairs"
    )
    corpus_test_size: int | float | None = Field(
        None, gt=0, description="held-out corpus documents when prompts come from prompt_source: a fraction if < 1, else a "
        "count (None: test_size)",
    )
    task_in_corpus: int | float = Field(
        0, ge=0, description="worked task examples (prompt + answer; never a test or RL problem) mixed into the training "
        "corpus when prompts come from prompt_source: a count, or a fraction of the rest; more = the format learned sooner",
    )
    bpe_vocab_size: int | None = Field(
        None, ge=260, description="train a byte-level BPE tokenizer of this many tokens on the training corpus (when the "
        "recipe names no tokenizer and no pretrained teacher): small keeps the LM head cheap; None: character level",
    )
    task_repeats: int = Field(
        1, ge=1, description="how many times each worked task example appears in the corpus (more = more of the "
        "teacher's training on the task, without more distinct problems)",
    )
    lastword_passages: int = Field(
        0, ge=0, description="held-out passages for the local lm-eval last-word tasks (multiple choice and generate-until, "
        "written to lm_eval_tasks/); 0: none",
    )
    padding_side: Literal["left", "right"] = Field("left", description="tokenizer padding side; left for generation")
    dedupe: bool = Field(True, description="drop repeated examples before splitting, so no example is in two splits")

    @field_validator("test_size", "corpus_test_size", "task_in_corpus")
    @classmethod
    def _count_or_fraction(cls, value: int | float | None, info: ValidationInfo) -> int | float | None:
        if value is not None and value >= 1 and value != int(value):
            raise ValueError(f"{info.field_name} must be a fraction < 1 or a whole count, got {value}")
        return value

    @field_validator("preference_pairs")
    @classmethod
    def _non_negative(cls, value: bool | int) -> bool | int:
        if not isinstance(value, bool) and value < 0:
            raise ValueError(f"preference_pairs must be true/false or a count >= 0, got {value}")
        return value


# ---------------------------------------------------------------------------------------- stage


def run(cfg: Config, ctx: StageContext) -> dict:
    """Load, split, tokenize and pack; save corpus/, prompts/, preferences/, tokenizer/ in ctx.out_dir."""
    out = Path(ctx.out_dir)
    rng = random.Random(ctx.seed)

    # --- examples: one Dataset per source, columns text (+ prompt, answer when the source has them)
    examples, given_test = load_examples(cfg.source, ctx.seed)
    if cfg.dedupe:
        examples = _dedupe(examples, "text")
    if cfg.prompt_source is None:
        task, corpus_pool = examples, None
    else:
        task, given_test = load_examples(cfg.prompt_source, ctx.seed)
        task = _dedupe(task, "prompt") if cfg.dedupe and "prompt" in task.column_names else task
        corpus_pool = examples

    # --- splits: test | rl | corpus, disjoint; a source's own test split replaces the carved one
    has_prompts = "prompt" in task.column_names
    if given_test is not None:
        test_texts = set(given_test["text"])
        test_rows, rest = given_test, task.filter(lambda row: row["text"] not in test_texts, desc="drop test overlap")
    else:
        test_rows, rest = _carve(task, _count(cfg.test_size, len(task)), ctx.seed, _name(cfg.source))
    rl_rows, leftover = None, rest
    if has_prompts and cfg.rl_prompts > 0:
        if corpus_pool is None and cfg.rl_prompts >= len(rest):
            raise ValueError(
                f"data: rl_prompts={cfg.rl_prompts} leaves no corpus examples from {_name(cfg.source)} "
                f"({len(task)} examples, {len(test_rows)} held out for test): lower rl_prompts or add examples"
            )
        if cfg.rl_prompts >= len(rest):
            rl_rows, leftover = rest, rest.select([])
        else:
            rl_rows, leftover = _carve(rest, cfg.rl_prompts, ctx.seed + 1, _name(cfg.source))
    task_examples = 0
    if corpus_pool is None:
        corpus_train, corpus_test = leftover, test_rows
    else:  # prompts come from elsewhere: the corpus source is split for training and perplexity
        held = _count(cfg.corpus_test_size or cfg.test_size, len(corpus_pool))
        corpus_test, corpus_train = _carve(corpus_pool, held, ctx.seed, _name(cfg.source))
        if cfg.task_in_corpus:  # worked examples the teacher learns the answer format from; never test or RL rows
            task_examples = min(len(leftover), _count(cfg.task_in_corpus, len(leftover)))
            worked = leftover.shuffle(seed=ctx.seed + 2).select(range(task_examples)).select_columns(["text"])
            corpus_train = concatenate_datasets([corpus_train.select_columns(["text"])] + [worked] * cfg.task_repeats)
            corpus_train = corpus_train.shuffle(seed=ctx.seed + 3)

    # --- tokenizer and packed corpus
    tokenizer = resolve_tokenizer(cfg, ctx.model, [examples, task], padding_side=cfg.padding_side, training_texts=corpus_train)
    corpus = DatasetDict(
        train=pack(corpus_train, tokenizer, cfg.seq_len),
        test=pack(corpus_test, tokenizer, cfg.seq_len),
    )
    if task_examples:  # the worked examples alone, once each: what a KD stage's task_share draws from
        corpus["task"] = pack(worked, tokenizer, cfg.seq_len)
    if len(corpus["train"]) == 0:
        raise ValueError(
            f"data: the training corpus from {_name(cfg.source)} has fewer than seq_len={cfg.seq_len} tokens "
            f"({len(corpus_train)} examples): add examples or lower seq_len"
        )
    if ctx.is_main_process:
        tokenizer.save_pretrained(out / "tokenizer")
        corpus.save_to_disk(str(out / "corpus"))
        Dataset.from_dict({"text": list(corpus_test["text"])}).save_to_disk(str(out / "heldout"))  # the held-out documents, raw

    metrics: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "corpus_examples": len(corpus_train),
        "corpus_train_blocks": len(corpus["train"]),
        "corpus_test_blocks": len(corpus["test"]),
        "corpus_train_tokens": len(corpus["train"]) * cfg.seq_len,
    }
    if task_examples:
        task_tokens = cfg.task_repeats * sum(len(ids) + 1 for ids in tokenizer(list(worked["text"]))["input_ids"])
        metrics.update(
            task_examples_in_corpus=task_examples,
            task_token_share=task_tokens / max(1, metrics["corpus_train_tokens"]),
            task_blocks=len(corpus["task"]),
        )
    if cfg.lastword_passages:
        passages = lastword_passages(corpus_test["text"], cfg.lastword_passages, ctx.seed)
        if ctx.is_main_process:
            write_lastword_tasks(passages, out / "lm_eval_tasks", random.Random(ctx.seed + 4))
        metrics["lastword_passages"] = len(passages)

    # --- prompts (and preference pairs) when the source has prompt/answer columns
    if has_prompts:
        keep = ["prompt", "answer"] + (["rg_entry"] if "rg_entry" in task.column_names else [])
        rl = rl_rows.select_columns(keep) if rl_rows is not None else Dataset.from_dict({"prompt": [], "answer": []})
        prompts = DatasetDict(train=rl, test=test_rows.select_columns(keep))
        metrics.update(rl_prompts=len(prompts["train"]), test_prompts=len(prompts["test"]))
        n_pairs = len(rl) if cfg.preference_pairs is True else int(cfg.preference_pairs)
        if n_pairs > len(rl):
            raise ValueError(f"data: preference_pairs={n_pairs} but only {len(rl)} RL prompts (raise rl_prompts)")
        if ctx.is_main_process:
            prompts.save_to_disk(str(out / "prompts"))
            if n_pairs:
                make_preferences(rl.select(range(n_pairs)), rng).save_to_disk(str(out / "preferences"))
        metrics["preference_pairs"] = n_pairs
    elif cfg.rl_prompts or cfg.preference_pairs:
        ctx.logger.warning(
            "data: %s has no prompt/answer columns: no prompts/ or preferences/ written "
            "(set prompt_column/answer_column, or a prompt_source)",
            _name(cfg.source),
        )
    if ctx.is_main_process:
        (out / "data_summary.json").write_text(json.dumps(metrics, indent=2))
    return metrics


# ------------------------------------------------------------------------------------- sources


def load_examples(source, seed: int) -> tuple[Dataset, Dataset | None]:
    """The source's examples as a Dataset with column `text` (and `prompt`, `answer` if known).

    Returns (examples, test examples from the source's own test split or None).
    """
    if isinstance(source, SyntheticSource):
        return arithmetic_problems(source, seed), None
    if isinstance(source, HubSource):
        raw = _load_hub(source, source.split)
        test = _standardize(_load_hub(source, source.test_split), source, source.hub) if source.test_split else None
        return _standardize(raw, source, source.hub), test
    if isinstance(source, FilesSource):
        return _standardize(_load_files(source), source, ", ".join(source.files)), None
    if isinstance(source, TextFolderSource):
        return Dataset.from_dict({"text": read_text_folder(source)}), None
    if isinstance(source, ReasoningGymSource):
        return reasoning_gym_problems(source, seed), None
    raise ValueError(f"unknown source {source!r}")


def _reasoning_gym():
    try:
        import reasoning_gym
    except ImportError:  # pragma: no cover - a dependency of the project
        raise ValueError("source.reasoning_gym needs the reasoning-gym package: pip install reasoning-gym==0.1.25") from None
    return reasoning_gym


def reasoning_gym_problems(source: ReasoningGymSource, seed: int) -> Dataset:
    """`size` problems of every task, posed through `template`; columns text, prompt, answer and
    rg_entry (the problem's JSON: what rewards.reasoning_gym hands back to the task's own scorer)."""
    rg = _reasoning_gym()
    rows: dict[str, list[str]] = {"text": [], "prompt": [], "answer": [], "rg_entry": []}
    for name in source.reasoning_gym:
        try:
            problems = rg.create_dataset(name, size=source.size, seed=seed if source.seed is None else source.seed, **source.config)
        except Exception as error:  # unknown task or generator setting: name the field
            raise ValueError(f"source.reasoning_gym {name!r} with config {source.config}: {error}") from error
        for i in range(len(problems)):
            entry = problems[i]
            prompt = source.template.format(question=entry["question"])
            rows["prompt"].append(prompt)
            rows["answer"].append(str(entry["answer"]))
            rows["text"].append(prompt + str(entry["answer"]))
            rows["rg_entry"].append(json.dumps(entry, default=str))
    return Dataset.from_dict(rows)


def text_folder_files(source: TextFolderSource) -> list[Path]:
    """The files `source.glob` matches under `source.text_folder`, sorted, each once."""
    folder = Path(source.text_folder)
    return sorted({path for pattern in source.glob for path in folder.glob(pattern) if path.is_file()})


def read_text_folder(source: TextFolderSource) -> list[str]:
    """One document per matched file (UTF-8, undecodable bytes replaced; .gz decompressed), files
    shorter than min_chars skipped, cut at max_chars, at most max_documents."""
    import gzip

    documents = []
    for path in text_folder_files(source):
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode("utf-8", errors="replace").strip()
        if len(text) < source.min_chars:
            continue
        documents.append(text[: source.max_chars] if source.max_chars else text)
        if source.max_documents is not None and len(documents) >= source.max_documents:
            break
    if not documents:
        raise ValueError(
            f"source.text_folder: no file under {source.text_folder} matching {source.glob} has {source.min_chars}+ characters"
        )
    return documents


def arithmetic_problems(source: SyntheticSource, seed: int) -> Dataset:
    """`num_problems` distinct problems `a<op>b=` with answer `str(a op b)`, shuffled by `seed`.

    Each problem's digit count d comes from `digits` (shares `digit_weights`), both operands have
    d digits (d = 1: 0..9), the operator from `operators`. A class (d, op) that has fewer distinct
    problems than its share asks for is an error, not a silent repeat.
    """
    rng = random.Random(seed)
    problems: list[tuple[str, str]] = []
    for (d, op, size), quota in zip(source.classes(), source.quotas()):  # quota <= size: the config checks it
        low, high = (0, 9) if d == 1 else (10 ** (d - 1), 10**d - 1)
        if quota > size // 2:  # dense: enumerate and sample, rejection sampling would crawl
            pairs = rng.sample(range(size), quota)
            operands = [(low + i // (high - low + 1), low + i % (high - low + 1)) for i in pairs]
        else:
            seen: set[tuple[int, int]] = set()
            operands = []
            while len(operands) < quota:
                pair = (rng.randint(low, high), rng.randint(low, high))
                if pair not in seen:
                    seen.add(pair)
                    operands.append(pair)
        for a, b in operands:
            result = a + b if op == "+" else a - b if op == "-" else a * b
            problems.append((f"{a}{op}{b}=", str(result)))
    rng.shuffle(problems)
    prompts = [p for p, _ in problems]
    answers = [a for _, a in problems]
    return Dataset.from_dict({"text": [p + a for p, a in problems], "prompt": prompts, "answer": answers})


def _apportion(total: int, shares: list[float]) -> list[int]:
    """Split `total` into integer parts proportional to `shares` (largest remainder), summing to total."""
    raw = [total * s for s in shares]
    parts = [int(x) for x in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: raw[i] - parts[i], reverse=True)
    for i in by_remainder[: total - sum(parts)]:
        parts[i] += 1
    return parts


def _load_hub(source: HubSource, split: str) -> Dataset:
    ds = load_dataset(source.hub, source.name, split=split, revision=source.revision, streaming=source.streaming)
    if source.streaming:  # a sample of a corpus too big to download: materialise the first N
        return Dataset.from_list(list(itertools.islice(ds, source.max_examples)))
    return ds


def _format_from_extension(path: str) -> str | None:
    suffixes = {".txt": "text", ".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}
    return suffixes.get(Path(path).suffix.lower())


def _check_files(source: FilesSource, where: str = "source") -> str:
    """The files exist, hold bytes and have a known format; returns the `datasets` builder name."""
    if not source.files:
        raise ValueError(f"{where}.files is empty: list at least one file")
    missing = [f for f in source.files if not Path(f).is_file()]
    if missing:
        raise ValueError(f"{where}.files: file not found: {', '.join(missing)}")
    fmt = source.format or _format_from_extension(source.files[0])
    if fmt is None:
        raise ValueError(f"{where}.files: cannot tell the format of {source.files[0]}; set {where}.format")
    if all(Path(f).stat().st_size == 0 for f in source.files):
        raise ValueError(f"{where}.files: the dataset is empty ({', '.join(source.files)} hold no bytes)")
    return "json" if fmt == "jsonl" else fmt


def _peek_files(source: FilesSource, where: str) -> None:
    """Read the first example only (streaming: nothing cached): parseable, not empty, right columns."""
    builder = _check_files(source, where)
    files = ", ".join(source.files)
    try:
        streamed = load_dataset(builder, data_files=[str(Path(f).resolve()) for f in source.files], split="train", streaming=True)
        first = next(iter(streamed))
    except StopIteration:
        raise ValueError(f"{where}.files: the dataset is empty ({files} hold no examples)") from None
    except Exception as error:  # parse errors arrive wrapped: name the files and the cause
        cause = error.__cause__ or error
        raise ValueError(f"{where}.files: cannot read {files} as {source.format or builder}: {cause}") from error
    for role in ("text", "prompt", "answer"):
        column = getattr(source, f"{role}_column")
        if column is not None and column not in first:
            raise ValueError(f"{where}.{role}_column: no column '{column}' in {files}; columns: {sorted(first)}")


def preflight(cfg: Config, ctx: StageContext) -> None:
    """Checks the runner makes before the run folder is touched: local files readable, not empty,
    with the named columns; the recipe's tokenizer loads. (Hub sources are left to the stage.)"""
    for field, source in (("source", cfg.source), ("prompt_source", cfg.prompt_source)):
        if isinstance(source, FilesSource):
            _peek_files(source, f"stages.data.{field}")
        if isinstance(source, TextFolderSource) and Path(source.text_folder).is_dir() and not text_folder_files(source):
            raise ValueError(f"stages.data.{field}.glob: no file under {source.text_folder} matches {source.glob}")
        if isinstance(source, ReasoningGymSource):  # unknown task names and settings fail here, not mid-run
            rg = _reasoning_gym()
            for name in source.reasoning_gym:
                try:
                    rg.create_dataset(name, size=1, seed=0, **source.config)
                except Exception as error:
                    raise ValueError(f"stages.data.{field}.reasoning_gym: {name!r} with config {source.config}: {error}") from error
    if ctx.model.tokenizer is not None:
        try:
            AutoTokenizer.from_pretrained(ctx.model.tokenizer, trust_remote_code=ctx.model.trust_remote_code)
        except (OSError, ValueError) as error:
            raise ValueError(f"model.tokenizer: cannot load '{ctx.model.tokenizer}' ({error})") from error


def _load_files(source: FilesSource) -> Dataset:
    builder = _check_files(source)
    fmt = source.format or _format_from_extension(source.files[0])
    try:
        return load_dataset(builder, data_files=[str(Path(f).resolve()) for f in source.files], split="train")
    except Exception as error:  # datasets wraps parse errors in DatasetGenerationError: name the files
        cause = error.__cause__ or error
        raise ValueError(f"source.files: cannot read {', '.join(source.files)} as {fmt}: {cause}") from error


def _standardize(raw: Dataset, source: _TextColumns, name: str) -> Dataset:
    """Rename the source's columns to text / prompt / answer; check they exist and are not empty."""
    if source.max_examples is not None:
        raw = raw.select(range(min(source.max_examples, len(raw))))
    if len(raw) == 0:
        raise ValueError(f"source {name}: the dataset is empty")
    wanted = {"text": source.text_column, "prompt": source.prompt_column, "answer": source.answer_column}
    for role, column in wanted.items():
        if column is not None and column not in raw.column_names:
            raise ValueError(
                f"source {name}: no column '{column}' (asked as {role}_column); columns: {raw.column_names}"
            )
    columns = {role: raw[column] for role, column in wanted.items() if column is not None}
    columns = {role: [str(v) for v in values] for role, values in columns.items()}
    if "text" not in columns:
        columns["text"] = [p + a for p, a in zip(columns["prompt"], columns["answer"])]
    return Dataset.from_dict(columns)


def _name(source) -> str:
    if isinstance(source, SyntheticSource):
        return f"synthetic:{source.synthetic}"
    if isinstance(source, HubSource):
        return f"hub:{source.hub}"
    if isinstance(source, TextFolderSource):
        return f"text_folder:{source.text_folder}"
    if isinstance(source, ReasoningGymSource):
        return "reasoning_gym:" + ",".join(source.reasoning_gym)
    return "files:" + ",".join(source.files)


# -------------------------------------------------------------------------------------- splits


def _dedupe(ds: Dataset, column: str) -> Dataset:
    """Keep the first occurrence of each value of `column` (order kept, so seeds stay meaningful)."""
    seen: set[str] = set()
    keep = []
    for i, value in enumerate(ds[column]):
        if value not in seen:
            seen.add(value)
            keep.append(i)
    return ds if len(keep) == len(ds) else ds.select(keep)


def _count(size: float, n: int) -> int:
    """A test size as a count: a fraction of n if < 1, else the count itself."""
    return max(1, round(size * n)) if size < 1 else int(size)


def _carve(ds: Dataset, n: int, seed: int, source_name: str) -> tuple[Dataset, Dataset]:
    """(n random rows, the other rows), disjoint; seeded."""
    if n >= len(ds):
        raise ValueError(
            f"data: asked to hold out {n} examples of {source_name}, which has only {len(ds)} after dedupe: "
            "lower test_size / rl_prompts or add examples"
        )
    split = ds.train_test_split(test_size=n, seed=seed, shuffle=True)
    return split["test"], split["train"]


# ----------------------------------------------------------------------------------- tokenizer


def build_char_tokenizer(alphabet: str, padding_side: str = "left") -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character of `alphabet`, plus the specials.

    Encoding prepends <bos> (every corpus example and every prompt starts the same way);
    decoding joins characters without spaces, so `decode(encode(s), skip_special_tokens=True) == s`.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    specials = list(SPECIAL_TOKENS.values())
    chars = sorted(set(alphabet) - set(specials))
    vocab = {token: i for i, token in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk"]))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char alone
    backend.decoder = decoders.Fuse()
    bos = SPECIAL_TOKENS["bos"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        padding_side=padding_side,
    )


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int, padding_side: str = "left") -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2's scheme: any string round-trips; digits split one by one) trained on `texts` with the
    `tokenizers` library, `vocab_size` tokens including <pad>, <bos>, <eos>, <unk>; encoding prepends
    <bos> like the character-level tokenizer. Deterministic for the same texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = list(SPECIAL_TOKENS.values())
    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk"]))
    # digits one by one (as Llama's and Qwen's tokenizers do): a number's tokens do not depend on its
    # neighbours, so "Answer: 140" and a prompt ending in "Answer: " split the same way, and the
    # model sees the digits it has to compute with
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos = SPECIAL_TOKENS["bos"]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, backend.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=SPECIAL_TOKENS["eos"], pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"], padding_side=padding_side, clean_up_tokenization_spaces=False,
    )


def resolve_tokenizer(cfg: Config, model: ModelConfig, example_sets: list[Dataset], padding_side: str,
                      training_texts: Dataset | None = None):
    """model.tokenizer, else the pretrained teacher's tokenizer, else one built here: a byte-level BPE
    trained on `training_texts` (the training corpus) when `bpe_vocab_size` is set, else character level."""
    name = model.tokenizer or model.teacher.pretrained
    if name is not None:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=model.trust_remote_code)
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {name} has no EOS token: the corpus needs one between packed examples")
        if tokenizer.pad_token_id is None:  # common for causal LMs; padding positions are masked anyway
            tokenizer.pad_token = tokenizer.eos_token
    elif cfg.bpe_vocab_size is not None:
        texts = training_texts if training_texts is not None else example_sets[0]
        tokenizer = train_bpe_tokenizer(texts["text"], cfg.bpe_vocab_size)
    elif isinstance(cfg.source, SyntheticSource) and cfg.prompt_source is None:
        tokenizer = build_char_tokenizer(ARITHMETIC_ALPHABET)
    else:
        alphabet: set[str] = set()
        for examples in example_sets:
            for column in ("text", "prompt", "answer"):
                if column in examples.column_names:
                    for value in examples[column]:
                        alphabet.update(value)
        tokenizer = build_char_tokenizer("".join(sorted(alphabet)))
    tokenizer.padding_side = padding_side
    return tokenizer


def pack(rows: Dataset, tokenizer, seq_len: int) -> Dataset:
    """Tokenize `text` (with the tokenizer's own specials) + EOS, concatenate, cut into seq_len blocks.

    The tail shorter than seq_len is dropped (at most seq_len - 1 tokens per 1000 examples).
    Returns a Dataset with column input_ids, each [seq_len].
    """
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch["text"])["input_ids"]
        return {"input_ids": [x + [eos] for x in ids]}

    def group(batch):
        stream = list(itertools.chain.from_iterable(batch["input_ids"]))
        usable = len(stream) // seq_len * seq_len
        return {"input_ids": [stream[i : i + seq_len] for i in range(0, usable, seq_len)]}

    tokenized = rows.map(tokenize, batched=True, remove_columns=rows.column_names, desc="tokenize")
    return tokenized.map(group, batched=True, batch_size=1000, desc=f"pack into {seq_len}-token blocks")


# --------------------------------------------------------------------------------- preferences


def make_preferences(rows: Dataset, rng: random.Random) -> Dataset:
    """(prompt, chosen = reference answer, rejected = a wrong answer) for DPO-style training.

    The wrong answer is a near miss for integer answers (off by 1..10, the errors a model makes)
    and otherwise the answer of another prompt that differs from this one's.
    """
    prompts, answers = rows["prompt"], rows["answer"]
    rejected = []
    for i, answer in enumerate(answers):
        try:
            value = int(answer)
            rejected.append(str(value + rng.choice([-1, 1]) * rng.randint(1, 10)))
        except ValueError:
            others = [a for a in answers[i + 1 :] + answers[:i] if a != answer]
            if not others:
                raise ValueError("preference_pairs: every answer is the same, no wrong answer to reject") from None
            rejected.append(others[0])
    return Dataset.from_dict({"prompt": prompts, "chosen": answers, "rejected": rejected})


# ------------------------------------------------------------------------- last-word lm-eval tasks


def lastword_passages(documents: Sequence[str], n: int, seed: int, context_chars: int = 400) -> list[dict[str, str]]:
    """Up to `n` LAMBADA-style passages from held-out documents: a paragraph of 30+ words whose last
    word (letters only, 3+, the paragraph's end) is the target, and up to `context_chars` characters
    before it (cut at a word boundary) the context. Deterministic for a seed."""
    import re

    candidates = []
    for document in documents:
        for paragraph in re.split(r"\n\s*\n", document):
            paragraph = " ".join(paragraph.split())
            match = re.search(r"(\S+) ([A-Za-z]{3,})[.!?]?$", paragraph)
            if match is None or len(paragraph.split()) < 30:
                continue
            context = paragraph[: match.start(2) - 1]
            if len(context) > context_chars:
                context = context[-context_chars:].split(" ", 1)[-1]
            candidates.append({"context": context, "target": match.group(2)})
    random.Random(seed).shuffle(candidates)
    return candidates[:n]


_LASTWORD_LOADER = '''"""Loader of the {name} lm-eval task: the JSONL beside this file (written by the data stage)."""

from pathlib import Path

import datasets


def load(**kwargs) -> datasets.DatasetDict:
    return datasets.DatasetDict({{"test": datasets.load_dataset("json", data_files=str(Path(__file__).with_name("{name}.jsonl")), split="train")}})
'''

_LASTWORD_TASKS = {
    "heldout_lastword_mc": """# Multiple choice: the held-out passage's last word against 3 last words of other passages,
# scored by lm-eval's loglikelihood of each (acc). Written by the data stage from data/heldout.
task: heldout_lastword_mc
dataset_path: json
custom_dataset: !function utils.load
output_type: multiple_choice
test_split: test
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    "heldout_lastword_gen": """# Generate-until (LAMBADA-style): greedy words after the held-out passage's context; the first
# word generated must be the passage's last word (lm-eval's exact_match). Written by the data stage.
task: heldout_lastword_gen
dataset_path: json
custom_dataset: !function utils.load
output_type: generate_until
test_split: test
doc_to_text: "{{context}}"
doc_to_target: "{{target}}"
target_delimiter: " "
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
filter_list:
  - name: first_word
    filter:
      - function: regex
        regex_pattern: "([A-Za-z]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
}


def write_lastword_tasks(passages: list[dict[str, str]], folder: Path, rng: random.Random) -> None:
    """Two lm-eval tasks over the same passages (folder/<task>/: YAML, JSONL, utils.py loader):
    heldout_lastword_mc (choices: the true last word and 3 others) and heldout_lastword_gen
    (`stages.tasks.LASTWORD_TASKS`, the names the eval stage accepts before they exist)."""
    targets = sorted({p["target"] for p in passages})
    for name, config in _LASTWORD_TASKS.items():
        task_dir = folder / name
        task_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        for passage in passages:
            row = dict(passage)
            if name.endswith("_mc"):
                others = rng.sample([t for t in targets if t != passage["target"]], k=min(3, len(targets) - 1))
                choices = others + [passage["target"]]
                rng.shuffle(choices)
                row |= {"choices": choices, "label": choices.index(passage["target"])}
            rows.append(row)
        (task_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (task_dir / f"{name}.yaml").write_text(config)
        (task_dir / "utils.py").write_text(_LASTWORD_LOADER.format(name=name))
