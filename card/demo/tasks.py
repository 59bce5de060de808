"""Synthetic tasks with checkable answers, and a character-level tokenizer, for ``card demo``.

Every problem is one line of text::

    prompt      = "<task>:<input>="          e.g. "rev:kqzvaeph="
    completion  = "<answer>\\n"               e.g. "hpeavzqk\\n"

A model sees ``prompt`` and must generate ``answer`` followed by a newline (generation stops at ``"\\n"``).
Tasks are chosen so that *future* answer characters are predictable from the prompt alone (copying,
reversing, sorting, adding with the digits written least-significant first): a CARD model can then fill
several masked answer positions confidently in one forward pass.

Problems are deterministic functions of a seed. The held-out split is structural: a problem belongs to the
evaluation split iff the SHA-256 of its prompt falls in a fixed bucket (``is_heldout``), so train and
eval sets never share a problem, whatever seeds and sizes are used.

``build_char_tokenizer`` gives one token per character (printable ASCII and newline) plus ``<pad>``,
``<s>``, ``</s>`` and ``<unk>``; it prepends ``<s>`` when encoding and decodes back to the exact text.
``write_task_files`` writes the training rows (``{"prompt", "completion"}``, JSONL; by default the prompt's
final ``"="`` is moved to the start of the completion so that CARD masking can cover every answer position,
see ``train_row``) and one held-out evaluation file per task (``{"prompt", "answer"}``, JSONL).
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import transformers as tf
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]  # newline + printable ASCII
MODEL_MAX_LENGTH = 256
STOP = "\n"

HELDOUT_BUCKETS = 16  # 1 in 16 of all possible problems is reserved for evaluation


# --------------------------------------------------------------------------------------------- tokenizer


def build_char_tokenizer(model_max_length: int = MODEL_MAX_LENGTH) -> tf.PreTrainedTokenizerFast:
    """A character-level fast tokenizer: every character of ``CHARS`` is one token; ``<s>`` is prepended.

    Ids: 0 ``<pad>``, 1 ``<s>``, 2 ``</s>``, 3 ``<unk>``, 4 ``"\\n"``, then ASCII 32..126 in order (100 in
    all). Characters outside ``CHARS`` encode to ``<unk>``. Decoding concatenates characters, so
    ``decode(encode(text), skip_special_tokens=True) == text`` for any text over ``CHARS``.
    """
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char, incl. "\n"
    tok.decoder = decoders.Fuse()  # join characters with nothing in between
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


# ------------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    """A family of problems: ``sample(rng)`` draws an input string, ``solve(input)`` gives its answer."""

    name: str
    sample: Callable[[random.Random], str]
    solve: Callable[[str], str]
    description: str

    def prompt(self, x: str) -> str:
        return f"{self.name}:{x}="


def _letters(lo: int, hi: int) -> Callable[[random.Random], str]:
    return lambda rng: "".join(rng.choices(string.ascii_lowercase, k=rng.randint(lo, hi)))


def _digits(lo: int, hi: int) -> Callable[[random.Random], str]:
    return lambda rng: "".join(rng.choices(string.digits, k=rng.randint(lo, hi)))


def _addends(width: int) -> Callable[[random.Random], str]:
    """Two numbers below 10**width, zero-padded to ``width`` digits, least-significant digit first: ``"a+b"``."""

    def sample(rng: random.Random) -> str:
        a, b = (str(rng.randrange(10**width)).zfill(width)[::-1] for _ in range(2))
        return f"{a}+{b}"

    return sample


def _add_reversed(x: str) -> str:
    """The sum of two least-significant-first numbers, least-significant first, ``width + 1`` digits."""
    a, b = x.split("+")
    return str(int(a[::-1]) + int(b[::-1])).zfill(len(a) + 1)[::-1]


DEFAULT_TASKS = ("copy", "rev", "add")  # "sort" is available but not parallel-friendly enough (see below)


def make_tasks(
    min_len: int = 6, max_len: int = 12, add_width: int = 6, names: tuple[str, ...] = DEFAULT_TASKS
) -> dict[str, Task]:
    """The tasks ``names``, in that order; strings are ``min_len``..``max_len`` characters, addends
    ``add_width`` digits.

    "sort" is the odd one out: the k-th character of a sorted string depends on counting the whole
    input, and a small CARD model fills masked sort positions confidently but wrongly far more often
    than copy/rev/add positions (in the research runs, parallel decoding at threshold 0.9 lost ~15
    points of exact match on sort and none on the others), so the default demo leaves it out.
    """
    tasks = [
        Task("copy", _letters(min_len, max_len), lambda x: x, "repeat the letters"),
        Task("rev", _letters(min_len, max_len), lambda x: x[::-1], "reverse the letters"),
        Task("sort", _digits(min_len, max_len), lambda x: "".join(sorted(x)), "sort the digits ascending"),
        Task("add", _addends(add_width), _add_reversed,
             "add two numbers; every number is zero-padded and written least-significant digit first"),
    ]
    by_name = {t.name: t for t in tasks}
    unknown = set(names) - set(by_name)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; known: {sorted(by_name)}")
    return {n: by_name[n] for n in names}


TASKS = make_tasks()  # the default demo task set
ALL_TASKS = make_tasks(names=("copy", "rev", "sort", "add"))


# ---------------------------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    task: str
    prompt: str
    answer: str

    @property
    def completion(self) -> str:
        return self.answer + STOP


def is_heldout(prompt: str) -> bool:
    """Whether ``prompt`` belongs to the evaluation split (a fixed hash bucket of the prompt text)."""
    return hashlib.sha256(prompt.encode()).digest()[0] % HELDOUT_BUCKETS == 0


def problems(task: Task, seed: int, split: str) -> Iterator[Problem]:
    """An endless, deterministic stream of ``split`` ("train" or "eval") problems of ``task``.

    The train stream may repeat a problem (the problem space is huge, so it rarely does); the eval stream
    never does.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    want_heldout = split == "eval"
    rng = random.Random(f"{seed}:{task.name}:{split}")
    seen: set[str] = set()
    while True:
        x = task.sample(rng)
        prompt = task.prompt(x)
        if is_heldout(prompt) != want_heldout or (want_heldout and prompt in seen):
            continue
        if want_heldout:
            seen.add(prompt)
        yield Problem(task.name, prompt, task.solve(x))


def take(stream: Iterator[Problem], n: int) -> list[Problem]:
    return [next(stream) for _ in range(n)]


def train_problems(n: int, seed: int, tasks: dict[str, Task] | None = None) -> list[Problem]:
    """``n`` training problems, tasks interleaved round-robin (so every prefix of the list is balanced)."""
    tasks = TASKS if tasks is None else tasks
    streams = [problems(t, seed, "train") for t in tasks.values()]
    return [next(streams[i % len(streams)]) for i in range(n)]


def eval_problems(n_per_task: int, seed: int, tasks: dict[str, Task] | None = None) -> dict[str, list[Problem]]:
    """``n_per_task`` distinct held-out problems of each task."""
    tasks = TASKS if tasks is None else tasks
    return {name: take(problems(t, seed, "eval"), n_per_task) for name, t in tasks.items()}


def train_row(p: Problem, separator_in_completion: bool = True) -> dict[str, str]:
    """One training row ``{"task", "prompt", "completion"}``; ``prompt + completion`` is always the full line.

    With ``separator_in_completion`` (the default) the prompt's final ``"="`` opens the completion instead
    (``"rev:abc"`` + ``"=cba\n"``). Why: the CARD noise masks ``N = floor(L * t) <= L - 1`` of the ``L``
    completion tokens (a suffix, for tail factor 1), so the completion's FIRST token is never masked. At
    inference the first parallel forward is ``prompt`` (ending in ``"="``) followed by masks, i.e. every
    answer position masked; with ``"="`` as the first completion token that context is exactly the most
    heavily masked training row, whereas with the answer as the completion it is never seen in training and
    a small model can fill those masks confidently but wrongly (research runs: reversal exact match fell
    from 1.00 to 0.30 under parallel decoding at threshold 0.9 for one seed). The evaluation prompts keep
    their ``"="`` (``Problem.prompt``), so AR/parallel decoding starts right after it as before.
    """
    if separator_in_completion:
        return {"task": p.task, "prompt": p.prompt[:-1], "completion": p.prompt[-1] + p.completion}
    return {"task": p.task, "prompt": p.prompt, "completion": p.completion}


def write_task_files(
    out_dir: str | Path, n_train: int, n_eval: int, seed: int = 0, tasks: dict[str, Task] | None = None,
    separator_in_completion: bool = True,
) -> dict[str, Path]:
    """Write ``train.jsonl`` (``{"task", "prompt", "completion"}`` rows, see ``train_row``) and
    ``eval_<task>.jsonl`` (``{"prompt", "answer"}`` rows, ``n_eval`` per task, the prompt ending in ``"="``)
    under ``out_dir``; return the paths by name (``"train"`` and each task name)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / "train.jsonl"}
    _write_jsonl(paths["train"], (train_row(p, separator_in_completion)
                                  for p in train_problems(n_train, seed, tasks)))
    for name, probs in eval_problems(n_eval, seed, tasks).items():
        paths[name] = out / f"eval_{name}.jsonl"
        _write_jsonl(paths[name], ({"prompt": p.prompt, "answer": p.answer} for p in probs))
    return paths


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
