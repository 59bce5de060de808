"""card.adapt.data on real files and the real `datasets`: formats, separators, packing, the validation
split, deterministic order, the cache, prompt/completion rows, streaming, and the one-line errors."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pandas as pd
import pytest
import transformers as tf

from card.adapt.data import (
    is_validation,
    iter_rows,
    load_data,
    micro_batch_indices,
    prepare_data,
    prepare_streaming,
)
from card.adapt.recipe import DataConfig
from card.errors import CardError
from tests import factory

DOCS = [f"Story {i}: Tom and Lily played with a red ball in the park, then the sun was bright." for i in range(30)]


@pytest.fixture(scope="module")
def tok():
    return factory.tiny_tokenizer()


@pytest.fixture(scope="module")
def stories_tok(data_dir):
    return tf.AutoTokenizer.from_pretrained(data_dir / "stories260K_hf")


def spec(tmp_path, path, **kw) -> DataConfig:
    kw.setdefault("validation_fraction", 0.1)
    return DataConfig(path=str(path), cache_dir=str(tmp_path / "cache"), **kw)


def load(s: DataConfig, tok, seq_len=16, separator="eos", fp="tok", **kw):
    return prepare_data(s, tok, seq_len, separator, fp, log=lambda m: None, **kw)


def stream_of(tok, docs, separator, validation_fraction=0.1):
    """The token stream packing should produce for the training documents."""
    ids = []
    for i, d in enumerate(docs):
        if is_validation(i, validation_fraction):
            continue
        t = tok(d, add_special_tokens=False)["input_ids"]
        ids += ([tok.bos_token_id] + t) if separator == "bos" else (t + [tok.eos_token_id]) if separator == "eos" else t
    return ids


def write_formats(d, docs) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    (d / "a.txt").write_text("\n\n".join(docs) + "\n")
    (d / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs)))
    (d / "a.json").write_text(json.dumps([{"text": t} for t in docs]))
    pd.DataFrame({"text": docs}).to_csv(d / "a.csv", index=False)
    pd.DataFrame({"text": docs}).to_parquet(d / "a.parquet")
    folder = d / "folder"
    folder.mkdir(exist_ok=True)
    (folder / "part0.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:12]))
    (folder / "part1.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[12:]))
    return {"txt": d / "a.txt", "jsonl": d / "a.jsonl", "json": d / "a.json", "csv": d / "a.csv",
            "parquet": d / "a.parquet", "folder": folder}


def test_every_format_gives_the_same_packed_rows(tmp_path, tok):
    files = write_formats(tmp_path / "src", DOCS)
    expected = stream_of(tok, DOCS, "eos")
    n_rows = len(expected) // 16
    for name, path in files.items():
        data = load(spec(tmp_path, path), tok)
        assert data.train.ids.shape == (n_rows, 16), name
        assert data.train.ids.ravel().tolist() == expected[: n_rows * 16], name
        assert data.info["train"]["documents"] == 27 and data.info["validation"]["documents"] == 3, name
        assert data.info["train"]["dropped_tokens"] == len(expected) - n_rows * 16
        assert data.train.valid is None and data.train.completion is None  # packed rows: all real, all maskable
        b = data.train.batch([0, 1])
        assert b.ids.shape == (2, 16) and bool(b.valid.all()) and bool(b.completion.all())


def test_txt_sample_by_line_and_document(tmp_path, tok):
    f = tmp_path / "t.txt"
    f.write_text("line one of story one\nline two of story one\n\nstory two\n")
    for sample_by, n_docs in (("line", 3), ("paragraph", 2), ("document", 1)):
        data = load(spec(tmp_path, f, sample_by=sample_by, validation_fraction=0.0), tok, seq_len=4)
        assert data.info["train"]["documents"] == n_docs, sample_by


@pytest.mark.parametrize("separator", ["bos", "eos", "none"])
def test_separator_placement(tmp_path, tok, separator):
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    data = load(spec(tmp_path, f), tok, seq_len=8, separator=separator)
    flat = data.train.ids.ravel().tolist()
    expected = stream_of(tok, DOCS, separator)
    assert flat == expected[: len(flat)]
    sep = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "none": None}[separator]
    if separator == "bos":
        assert flat[0] == sep  # BOS before every document, as llama2.c trained
    if sep is not None:
        assert expected.count(sep) == 27


def test_validation_split_is_disjoint_and_seed_free(tmp_path, tok):
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    s = spec(tmp_path, f, validation_fraction=0.2, packing=False)
    data = load(s, tok, seq_len=128)
    decode = lambda rows: {tok.decode(r[v]) .replace("</s>", "").strip() for r, v in zip(rows.ids, rows.valid)}  # noqa: E731
    train, val = decode(data.train), decode(data.validation)
    assert len(val) == 6 and len(train) == 24 and not train & val
    assert val == {DOCS[i] for i in (4, 9, 14, 19, 24, 29)}  # every 5th document, whatever the seed
    assert sum(is_validation(i, 0.01) for i in range(1000)) == 10


def test_order_is_a_pure_function_of_seed_step_micro_rank():
    n = 50
    a = [micro_batch_indices(n, 0, step, m, r, 2, 2, 3) for step in range(5) for m in range(2) for r in range(2)]
    b = [micro_batch_indices(n, 0, step, m, r, 2, 2, 3) for step in range(5) for m in range(2) for r in range(2)]
    c = [micro_batch_indices(n, 1, step, m, r, 2, 2, 3) for step in range(5) for m in range(2) for r in range(2)]
    assert a == b and a != c
    # one epoch visits every row once; the next epoch is a different order
    epoch = [i for step in range(25) for i in micro_batch_indices(n, 0, step, 0, 0, 1, 1, 2)]
    assert sorted(epoch[:50]) == list(range(50)) and epoch[:50] != list(range(50))
    assert micro_batch_indices(n, 0, 25, 0, 0, 1, 1, 2) != epoch[:2]
    # a step's global batch is the same rows however it is split across ranks and accumulation
    two_ranks = {i for r in range(2) for i in micro_batch_indices(n, 0, 3, 0, r, 2, 1, 4)}
    one_rank_gas2 = {i for m in range(2) for i in micro_batch_indices(n, 0, 3, m, 0, 1, 2, 4)}
    assert two_ranks == one_rank_gas2


def test_step_batches_match_the_pure_function(tmp_path, tok):
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    data = load(spec(tmp_path, f), tok)
    it = data.step_batches(start_step=3, rank=1, world=2, gas=2, mb=2, seed=7)
    first = next(it)
    assert len(first) == 2
    expect = data.train.batch(micro_batch_indices(len(data.train), 7, 3, 1, 1, 2, 2, 2))
    assert first[1].ids.equal(expect.ids)


def test_cache_hit_on_second_run(tmp_path, stories_tok, data_dir):
    """The real TinyStories file: the second preparation loads the cache instead of tokenising."""
    f = data_dir / "tinystories" / "tinystories_v1_validation_first_stories.txt"
    s = spec(tmp_path, f, validation_fraction=0.02, max_validation_blocks=16)
    logs: list[str] = []
    t0 = time.perf_counter()
    first = prepare_data(s, stories_tok, 256, "bos", "fp", log=logs.append)
    t1 = time.perf_counter()
    cache = first.info["cache"]
    mtimes = {p: os.stat(os.path.join(cache, p)).st_mtime_ns for p in os.listdir(cache)}
    second = prepare_data(s, stories_tok, 256, "bos", "fp", log=logs.append)
    t2 = time.perf_counter()
    assert not first.info["cache_hit"] and second.info["cache_hit"]
    assert any("tokenising" in m for m in logs) and logs[-1].startswith("data: cache hit")
    assert t2 - t1 < (t1 - t0) / 3  # no tokenising the second time (the log and the mtimes say so too)
    assert {p: os.stat(os.path.join(cache, p)).st_mtime_ns for p in os.listdir(cache)} == mtimes
    assert np.array_equal(first.train.ids, second.train.ids) and len(second.validation) == 16
    assert first.train.ids.shape[1] == 256 and first.info["train"]["rows"] > 1400
    assert (first.train.ids == stories_tok.bos_token_id).sum() > 4000  # a BOS before each paragraph
    # ranks that wait for the builder load the same cache and never build
    assert prepare_data(s, stories_tok, 256, "bos", "fp", build=False, log=logs.append).info["cache_hit"]
    # another seq_len, separator or tokenizer is another cache
    assert not prepare_data(s, stories_tok, 128, "bos", "fp", log=logs.append).info["cache_hit"]
    with pytest.raises(CardError, match="is missing"):
        prepare_data(s, stories_tok, 256, "eos", "fp", build=False, log=logs.append)


def test_cache_follows_file_changes(tmp_path, tok):
    f = tmp_path / "docs.txt"
    f.write_text("\n\n".join(DOCS))
    assert not load(spec(tmp_path, f), tok).info["cache_hit"]
    assert load(spec(tmp_path, f), tok).info["cache_hit"]
    f.write_text("\n\n".join(DOCS[::-1]))
    assert not load(spec(tmp_path, f), tok).info["cache_hit"]


def test_prompt_completion_rows(tmp_path, tok):
    recs = [{"q": "12 + 35 =", "a": " 47"}, {"q": "copy: abc ->", "a": " abc"}, {"q": "The sun was bright. 3 + 4 =", "a": " 7"},
            {"q": "The sun was bright and the sky was blue. " * 6 + "sort: 3142 ->", "a": " 1234"}] * 4
    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    s = spec(tmp_path, f, prompt_field="q", completion_field="a", validation_fraction=0.2)
    data = load(s, tok, seq_len=24, separator="eos")
    assert len(data.train) == 13 and len(data.validation) == 3
    rows = data.train
    for ids, valid, comp in zip(rows.ids, rows.valid, rows.completion):
        n = int(valid.sum())
        assert valid[:n].all() and not valid[n:].any()  # right-padded
        assert ids[n - 1] == tok.eos_token_id and comp[n - 1]  # prompt + completion + EOS; EOS is maskable
        text = tok.decode(ids[:n][comp[:n]])
        assert text.replace("</s>", "") in (" 47", " abc", " 7", " 1234")
        k = n - int(comp[:n].sum())
        assert 0 < k < n and not comp[:k].any() and comp[k:n].all()  # the prompt is never maskable
    short = [i for i in range(len(rows)) if not rows.valid[i].all()]
    assert {tok.decode(rows.ids[i][rows.valid[i]]) for i in short} == {  # short prompts are kept whole
        "12 + 35 = 47</s>", "copy: abc -> abc</s>", "The sun was bright. 3 + 4 = 7</s>"}
    long = [i for i in range(len(rows)) if rows.valid[i].all()]
    assert long and data.info["train"]["truncated"] == len(long)  # the long prompt was cut from the left
    assert tok.decode(rows.ids[long[0]]).endswith("sort: 3142 -> 1234</s>")
    b = rows.batch([0, 1])
    assert b.completion.sum() < b.valid.sum() and not (b.completion & ~b.valid).any()
    # with BOS as separator the row starts with it
    data = load(s, tok, seq_len=24, separator="bos")
    assert (data.train.ids[:, 0] == tok.bos_token_id).all() and not data.train.completion[:, 0].any()


def test_unpacked_text_rows(tmp_path, tok):
    f = tmp_path / "docs.txt"
    f.write_text("\n\n".join(DOCS))
    data = load(spec(tmp_path, f, packing=False), tok, seq_len=128)
    assert len(data.train) == 27 and data.train.valid is not None and data.train.completion is None
    assert all(int(v.sum()) == len(tok(d, add_special_tokens=False)["input_ids"]) + 1
               for v, d in zip(data.train.valid, [d for i, d in enumerate(DOCS) if not is_validation(i, 0.1)]))


def test_data_errors_name_the_key(tmp_path, tok):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(CardError, match=r"^recipe key data.path: .* has no training documents"):
        load(spec(tmp_path, empty), tok)
    f = tmp_path / "docs.jsonl"
    f.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(CardError, match=r"^recipe key data.text_field: column 'text' not found in path \(columns: body\)"):
        load(spec(tmp_path, f), tok)
    with pytest.raises(CardError, match=r"^recipe key data.prompt_field: column 'q' not found"):
        load(spec(tmp_path, f, prompt_field="q", completion_field="a"), tok)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("x")
    (mixed / "b.jsonl").write_text("{}")
    with pytest.raises(CardError, match=r"^recipe key data.path: .* mixes file formats"):
        load(spec(tmp_path, mixed), tok)
    with pytest.raises(CardError, match=r"^recipe key data.path: cannot load dataset no-such-org/no-such-data"):
        load(DataConfig(path="no-such-org/no-such-data", cache_dir=str(tmp_path / "c")), tok)
    with pytest.raises(CardError, match=r"^recipe key data.separator: the tokenizer has no bos token"):
        load(spec(tmp_path, empty), factory.tiny_tokenizer().__class__(
            tokenizer_object=tok.backend_tokenizer, eos_token="</s>"), separator="bos")


def test_streaming_local_file(tmp_path, tok):
    f = tmp_path / "docs.txt"
    f.write_text("\n\n".join(DOCS))
    s = spec(tmp_path, f, streaming=True, shuffle_buffer=8)
    data = prepare_streaming(s, tok, 16, "eos", log=lambda m: None)
    cached = load(spec(tmp_path, f), tok)
    assert np.array_equal(data.validation.ids, cached.validation.ids)  # the same held-out documents
    run = lambda seed, start=0: [b.ids for step in zip(range(6), data.step_batches(start, 0, 1, 2, 2, seed)) for b in step[1]]  # noqa: E731
    a, b, c = run(0), run(0), run(1)
    assert all(x.equal(y) for x, y in zip(a, b)) and not all(x.equal(y) for x, y in zip(a, c))
    assert all(x.shape == (2, 16) for x in a)
    resumed = run(0, start=3)[:4]
    assert all(x.equal(y) for x, y in zip(resumed, a[6:10]))  # resuming at step 3 skips 3 steps of rows
    assert load_data(s, tok, 16, "eos", "fp", log=lambda m: None).__class__.__name__ == "StreamingData"
    # each rank tokenises only its share of the documents: together the ranks see every training document
    seen = []
    for rank in range(2):
        stats = dict(documents=0, tokens=0, dropped_tokens=0, truncated=0)
        rows = list(iter_rows(data._train_docs(rank, 2), tok, data.fmt, stats))
        seen.append(stats["documents"])
        assert rows and stats["documents"] in (13, 14)
    assert sum(seen) == 27
    r0 = next(data.step_batches(0, 0, 2, 1, 2, 0))[0].ids
    r1 = next(data.step_batches(0, 1, 2, 1, 2, 0))[0].ids
    assert not r0.equal(r1)
