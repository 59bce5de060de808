"""The demo's synthetic tasks and character-level tokenizer."""

from __future__ import annotations

import json
import random

import pytest
import transformers as tf

from card.demo.tasks import (
    ALL_TASKS,
    CHARS,
    TASKS,
    Problem,
    build_char_tokenizer,
    eval_problems,
    is_heldout,
    make_tasks,
    problems,
    train_problems,
    write_task_files,
)


def _split_prompt(p: Problem) -> tuple[str, str]:
    name, rest = p.prompt.split(":", 1)
    assert rest.endswith("=")
    return name, rest[:-1]


def _check_answer(p: Problem) -> None:
    """An independent check of each task's answer (not the task's own ``solve``)."""
    name, x = _split_prompt(p)
    assert name == p.task
    y = p.answer
    if name == "copy":
        assert y == x and x.isalpha() and x.islower()
    elif name == "rev":
        assert len(y) == len(x) and all(y[i] == x[len(x) - 1 - i] for i in range(len(x)))
    elif name == "sort":
        assert x.isdigit() and sorted(x) == sorted(y)
        assert all(a <= b for a, b in zip(y, y[1:]))
    elif name == "add":
        a, b = x.split("+")
        # digits are least-significant first: a = sum a[i] * 10^i
        value = lambda s: sum(int(d) * 10**i for i, d in enumerate(s))  # noqa: E731
        assert value(a) + value(b) == value(y)
        assert len(a) == len(b) and len(y) == len(a) + 1 and (a + b + y).isdigit()  # zero-padded
    else:
        raise AssertionError(f"unknown task {name}")


def test_answers_are_correct():
    rows = train_problems(400, seed=3, tasks=ALL_TASKS)
    rows += [q for v in eval_problems(50, seed=3, tasks=ALL_TASKS).values() for q in v]
    assert {p.task for p in rows} == set(ALL_TASKS)
    for p in rows:
        _check_answer(p)
        assert p.completion == p.answer + "\n"
        assert "\n" not in p.prompt and "\n" not in p.answer


def test_deterministic_and_seed_dependent():
    assert train_problems(100, seed=1) == train_problems(100, seed=1)
    assert eval_problems(20, seed=1) == eval_problems(20, seed=1)
    assert train_problems(100, seed=1) != train_problems(100, seed=2)


def test_train_rows_are_balanced_and_lengths_in_range():
    rows = train_problems(20 * len(TASKS), seed=0)
    assert [p.task for p in rows[: len(TASKS)]] == list(TASKS)
    for name in TASKS:
        assert sum(p.task == name for p in rows) == 20
    tasks = make_tasks(min_len=3, max_len=5, add_width=4, names=("copy", "rev", "sort", "add"))
    for p in train_problems(200, seed=0, tasks=tasks):
        x = _split_prompt(p)[1]
        assert len(x) == 9 if p.task == "add" else 3 <= len(x) <= 5


def test_heldout_split_is_disjoint():
    train = {p.prompt for p in train_problems(12000, seed=0)}
    held = {p.prompt for v in eval_problems(300, seed=0).values() for p in v}
    held_other_seed = {p.prompt for v in eval_problems(300, seed=7).values() for p in v}
    assert len(held) == 300 * len(TASKS)  # no duplicates within the eval set
    assert not train & held and not train & held_other_seed
    assert all(is_heldout(p) for p in held) and not any(is_heldout(p) for p in train)


def test_bad_names_are_refused():
    with pytest.raises(ValueError):
        next(problems(TASKS["copy"], 0, "test"))
    with pytest.raises(ValueError):
        make_tasks(names=("copy", "mul"))


def test_tokenizer_round_trip(tmp_path):
    tok = build_char_tokenizer()
    rng = random.Random(0)
    texts = ["".join(rng.choices(CHARS, k=rng.randint(0, 60))) for _ in range(50)]
    texts += ["rev:abc=cba\n", "  two  spaces ,. ", "\n\nx\n", "a <s> b"]
    tok.save_pretrained(tmp_path)
    loaded = tf.AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.model_max_length == tok.model_max_length
    for t in (tok, loaded):
        assert len(t) == 4 + len(CHARS)
        assert (t.pad_token_id, t.bos_token_id, t.eos_token_id) == (0, 1, 2)
        for text in texts:
            ids = t(text).input_ids
            if "<s>" not in text:
                assert ids == [t.bos_token_id] + [t.convert_tokens_to_ids(c) for c in text]  # one token a char
                assert t.decode(ids, skip_special_tokens=True) == text
            assert t.decode(ids[1:]) == text  # without the BOS, the exact text back


def test_tokenizer_accepts_an_added_mask_token():
    tok = build_char_tokenizer()
    tok.add_special_tokens({"mask_token": "<|mask|>"})
    ids = tok("ab<|mask|>c").input_ids
    assert ids == [tok.bos_token_id, tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b"),
                   tok.mask_token_id, tok.convert_tokens_to_ids("c")]


def test_write_task_files(tmp_path):
    paths = write_task_files(tmp_path / "data", n_train=40, n_eval=10, seed=0)
    assert set(paths) == {"train", *TASKS}
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert len(train) == 40 and set(train[0]) == {"task", "prompt", "completion"}
    for row in train:
        # the separator "=" opens the completion, so CARD masking can reach every answer position
        assert not row["prompt"].endswith("=") and row["completion"].startswith("=")
        _check_answer(Problem(row["task"], row["prompt"] + "=", row["completion"][1:-1]))
        assert row["completion"].endswith("\n")
    old = write_task_files(tmp_path / "old", n_train=40, n_eval=10, seed=0, separator_in_completion=False)
    old_rows = [json.loads(line) for line in old["train"].read_text().splitlines()]
    assert [r["prompt"] + r["completion"] for r in old_rows] == [r["prompt"] + r["completion"] for r in train]
    for row in old_rows:
        assert row["prompt"].endswith("=")
        _check_answer(Problem(row["task"], row["prompt"], row["completion"][:-1]))
    for name in TASKS:
        rows = [json.loads(line) for line in paths[name].read_text().splitlines()]
        assert len(rows) == 10 and set(rows[0]) == {"prompt", "answer"}
        for row in rows:
            _check_answer(Problem(name, row["prompt"], row["answer"]))
            assert is_heldout(row["prompt"])
    assert write_task_files(tmp_path / "again", 40, 10, 0)["train"].read_text() == paths["train"].read_text()
