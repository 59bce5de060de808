"""Dataset loaders for the lm-eval tasks over the workspace's real evaluation files (offline).

lm-eval calls these through ``custom_dataset: !function shared_tasks.<name>``; files are found through
``card.paths.shared_data_dir()`` (``CARD_DATA_DIR``), so the YAMLs work from any working directory.
The TinyStories tasks use the last 10% of the file's paragraphs (``train[90%:]`` in ``datasets``' split
syntax), which the stories260K adaptation recipe holds out of training (``train[:90%]``).
"""

from __future__ import annotations

import bz2
import json
import re

import datasets

from card.paths import shared_data_dir

TINYSTORIES = "tinystories/tinystories_v1_validation_first_stories.txt"
HELDOUT_SPLIT = "train[90%:]"  # evaluated here
TRAIN_SPLIT = "train[:90%]"  # what the real-run adaptation trains on


def _dd(**splits) -> datasets.DatasetDict:
    return datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})


def piqa(**kwargs) -> datasets.DatasetDict:
    d = shared_data_dir() / "eval"
    goals = [json.loads(line) for line in (d / "piqa_valid.jsonl").read_text().splitlines() if line.strip()]
    labels = [int(x) for x in (d / "piqa_valid-labels.lst").read_text().split()]
    rows = [{**g, "label": lab} for g, lab in zip(goals, labels, strict=True)]
    return _dd(validation=rows)


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(**kwargs) -> datasets.DatasetDict:
    """6 lines per item: 'activity_label: context', the gold index, then the 4 endings."""
    with bz2.open(shared_data_dir() / "eval" / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    rows = []
    for i in range(0, len(lines) - 5, 6):
        rows.append({
            "query": _hellaswag_preprocess(lines[i]),
            "label": int(lines[i + 1]),
            "choices": [_hellaswag_preprocess(e) for e in lines[i + 2 : i + 6]],
        })
    return _dd(validation=rows)


def gsm8k(**kwargs) -> datasets.DatasetDict:
    d = shared_data_dir() / "eval"
    read = lambda name: [json.loads(x) for x in (d / name).read_text().splitlines() if x.strip()]  # noqa: E731
    return _dd(train=read("gsm8k_train.jsonl"), test=read("gsm8k_test.jsonl"))


def _tinystories_heldout() -> list[str]:
    ds = datasets.load_dataset("text", data_files=str(shared_data_dir() / TINYSTORIES), sample_by="paragraph",
                               split=HELDOUT_SPLIT)
    return [t.strip() for t in ds["text"] if t.strip()]


def tinystories_text(**kwargs) -> datasets.DatasetDict:
    return _dd(test=[{"text": t} for t in _tinystories_heldout()])


def tinystories_continuation(**kwargs) -> datasets.DatasetDict:
    """Prompt: a held-out paragraph's first sentence; reference: its next sentence."""
    rows = []
    for t in _tinystories_heldout():
        sentences = re.split(r"(?<=[.!?])\s+", t)
        if len(sentences) >= 2 and len(sentences[0]) >= 20:
            rows.append({"prompt": sentences[0], "continuation": sentences[1]})
    return _dd(test=rows)


def perplexity_results(doc, results):
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"]))
    n_bytes = len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, n_bytes),
            "bits_per_byte": (loglikelihood, n_bytes)}
