"""Lossless compression with a CARD model (card.ardm.compress): byte-exact round trips in exact and budget
modes, coded bits equal to the model's likelihood, one-line failures that write nothing."""

import math
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from card.ardm import container
from card.ardm.compress import Codec, batches, compress_file, decompress_file
from card.ardm.plan import steps_for_budget
from card.checkpoint import load_checkpoint
from card.cli import app
from card.convert import convert
from card.errors import CardError
from card.profile import measure_slot_profile, text_rows, write_slot_profile
from tests.factory import CORPUS

WINDOW = 16  # tiny windows, so that most inputs span several (and some a partial last one)


def _card(src, dst):
    convert(str(src), dst)
    ck = load_checkpoint(dst, dtype="float32")
    rows = text_rows(ck.tokenizer, " ".join(CORPUS * 2), 24, 8)
    write_slot_profile(dst, measure_slot_profile(ck.model, rows, 3, [0, 4, 12]))
    return dst


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt, tmp_path_factory, one_thread):
    return _card(tiny_ckpt("llama"), tmp_path_factory.mktemp("cz") / "card")


@pytest.fixture(scope="module")
def codec(ckpt):
    return Codec.load(ckpt)


inputs = st.one_of(
    st.binary(max_size=120),
    st.text(max_size=60).map(lambda t: t.encode("utf-8")),
    st.lists(st.sampled_from(CORPUS), max_size=3).map(lambda xs: " ".join(xs).encode()),
    st.tuples(st.text(max_size=30), st.binary(min_size=1, max_size=4)).map(lambda p: p[0].encode() + b"\xff" + p[1]),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=inputs)
@example(data=b"")
@example(data=b"\x00")
@example(data="é☃🎉 naïve".encode())
@example(data=b"\xc3\x28 invalid")
@example(data=bytes(range(256)) * 2)  # longer than many windows
def test_round_trip_exact_and_budget(codec, data):
    for budget in (1.0, 0.5):
        blob, stats = codec.compress(data, budget=budget, window=WINDOW)
        out, back = codec.decompress(blob)
        assert out == data
        assert back.forwards == stats.forwards == sum(steps_for_budget(max(ls), budget, 1 if budget == 1 else 4)
                                                      * len(ls) for _, ls in batches(stats.tokens, WINDOW, 64))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=inputs, budget=st.sampled_from([0.25, 0.33, 0.9]), batch=st.integers(1, 3))
def test_round_trip_other_budgets_and_batches(codec, data, budget, batch):
    blob, stats = codec.compress(data, budget=budget, window=WINDOW, batch=batch)
    assert codec.decompress(blob)[0] == data


def test_modes_text_when_it_round_trips_else_bytes(codec):
    assert codec.to_symbols(" ".join(CORPUS).encode())[0] == "text"
    assert codec.to_symbols(b"\xff\xfe\x00abc")[0] == "bytes"
    mode, sym = codec.to_symbols(b"\x80\x81")
    assert mode == "bytes" and sym.tolist() == [0x80, 0x81]


def test_exact_mode_codes_the_models_likelihood(codec):
    """The payload is the AR log-loss of the text (windows from BOS), to within the coder's overhead: proof
    that slot 1 is read from the right position and the tokens are the tokenizer's."""
    text = " ".join(CORPUS).encode()
    mode, sym = codec.to_symbols(text)
    ids = codec.vocab_ids[sym]
    bits = 0.0
    for starts, lengths in batches(len(ids), WINDOW, 64):
        for start, T in zip(starts, lengths):
            x = torch.tensor([codec.start_id, *ids[start:start + T]])
            with torch.no_grad():
                logits = codec.model(input_ids=x[None]).logits[0, :-1][:, torch.as_tensor(codec.vocab_ids)]
            logp = torch.log_softmax(logits.double(), -1)
            bits += -logp[torch.arange(T), torch.as_tensor(sym[start:start + T])].sum().item() / math.log(2)
    blob, stats = codec.compress(text, window=WINDOW)
    payload_bits = 8 * (len(blob) - container.HEADER_SIZE)
    assert bits <= payload_bits + 1 and payload_bits <= 1.01 * bits + 64


def _files(tmp_path, codec, data=b"Tom had a red ball. \xff binary tail", budget=1.0):
    src, z = tmp_path / "in.bin", tmp_path / "in.cz"
    src.write_bytes(data)
    compress_file(None, src, z, budget=budget, window=WINDOW, codec=codec)
    return src, z


@pytest.mark.parametrize("damage", ["truncate", "flip_payload", "flip_header", "append"])
def test_damaged_files_fail_in_one_line_and_write_nothing(codec, tmp_path, damage):
    _, z = _files(tmp_path, codec)
    blob = bytearray(z.read_bytes())
    if damage == "truncate":
        blob = blob[:-3]
    elif damage == "flip_payload":
        blob[-2] ^= 0x10
    elif damage == "flip_header":
        blob[40] ^= 0x01
    else:
        blob += b"\0"
    z.write_bytes(bytes(blob))
    out = tmp_path / "out.bin"
    with pytest.raises(CardError) as e:
        decompress_file(None, z, out, codec=codec)
    assert len(str(e.value).splitlines()) == 1 and ("truncated" in str(e.value) or "corrupted" in str(e.value))
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["in.bin", "in.cz"]


def test_another_model_is_refused(codec, tiny_ckpt, tmp_path):
    _, z = _files(tmp_path, codec)
    other = Codec.load(_card(tiny_ckpt("llama", seed=1), tmp_path / "other"))
    with pytest.raises(CardError, match="another model"):
        decompress_file(None, z, tmp_path / "out", codec=other)
    assert not (tmp_path / "out").exists()


def test_budget_needs_a_profile_and_the_same_profile(codec, ckpt, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(ckpt, bare)
    import json

    cfg = json.loads((bare / "config.json").read_text())
    cfg["card"]["slot_profile"] = None
    (bare / "config.json").write_text(json.dumps(cfg))
    bare_codec = Codec.load(bare)
    with pytest.raises(CardError, match="card profile CKPT --data FILE --write"):
        bare_codec.compress(b"hello", budget=0.5)
    _, z = _files(tmp_path, codec, budget=0.5)
    with pytest.raises(CardError, match="slot profile"):
        decompress_file(None, z, tmp_path / "out", codec=bare_codec)


def test_cli_round_trip_with_summary(ckpt, tmp_path):
    src = tmp_path / "story.txt"
    src.write_bytes(("\n\n".join(CORPUS) + "\n").encode() * 3)
    z, out = tmp_path / "story.cz", tmp_path / "story.out"
    r = CliRunner().invoke(app, ["compress", str(ckpt), str(src), str(z), "--budget", "0.5", "--window", "32"])
    assert r.exit_code == 0, r.output
    assert "bits/byte" in r.output and "tokens/forward" in r.output and " s" in r.output
    r = CliRunner().invoke(app, ["decompress", str(ckpt), str(z), str(out)])
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == src.read_bytes()
    again = CliRunner().invoke(app, ["decompress", str(ckpt), str(z), str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
    bad = CliRunner().invoke(app, ["decompress", str(ckpt), str(src), str(tmp_path / "x")])
    assert bad.exit_code == 2 and "not a card compress file" in bad.output and not (tmp_path / "x").exists()


@given(st.integers(0, 200), st.integers(1, 40), st.integers(1, 8))
def test_windows_cover_the_stream_in_order(n, window, batch):
    b = batches(n, window, batch)
    spans = [(s, T) for starts, lengths in b for s, T in zip(starts, lengths)]
    assert len(spans) == -(-n // window) and all(len(starts) <= batch for starts, _ in b)
    assert [s for s, _ in spans] == [sum(T for _, T in spans[:i]) for i in range(len(spans))]  # contiguous
    assert sum(T for _, T in spans) == n and all(0 < T <= window for _, T in spans)
    assert not spans or max(T for _, T in spans) - min(T for _, T in spans) <= 1  # balanced: no tiny last window


def test_header_round_trip():
    h = container.Header(b"w" * 16, b"t" * 16, "bytes", float(np.float32(0.33)), 512, 64, 9, 2, b"p" * 8, 10, 7,
                         b"c" * 16)
    assert container.unpack(container.pack(h, b"abcd")) == (h, b"abcd")


def test_thread_count_is_recorded_and_replayed(codec):
    data = " ".join(CORPUS).encode()
    blob, stats = codec.compress(data, window=WINDOW, threads=2)
    assert container.unpack(blob)[0].threads == 2 == stats.settings["threads"]
    assert codec.compress(data, window=WINDOW)[1].settings["threads"] == 1  # the default: one thread
    assert codec.decompress(blob)[0] == data
    with pytest.raises(CardError, match="threads"):
        codec.compress(data, threads=0)
