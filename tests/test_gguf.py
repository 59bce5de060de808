"""GGUF sources that ``card-convert`` must refuse, each in one line, before any weight is read and leaving
nothing behind. The files are real GGUF files written with the ``gguf`` package (the conversion of a real
GGUF model is in tests/test_real_model.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from card.convert import convert
from card.convert.gguf import is_gguf, read_header
from card.errors import CardError

CARD_CONVERT = Path(sys.executable).parent / "card-convert"


def write_gguf(path: Path, arch: str) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def refused(src, tmp_path: Path, match: str, **kw) -> str:
    dst = tmp_path / "out" / "dst"
    with pytest.raises(CardError, match=match) as e:
        convert(str(src), dst, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    assert not dst.exists() and not (dst.parent.exists() and any(dst.parent.iterdir()))
    return msg


def test_header_is_read_without_the_weights(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", "rwkv7")
    assert is_gguf(path) and not is_gguf(tmp_path)
    h = read_header(path)
    assert (h.architecture, h.name, h.file_type, h.tensor_types) == ("rwkv7", "tiny-rwkv7", "Q8_0", {"F32": 1})


def test_unsupported_architecture_is_refused(tmp_path):
    msg = refused(write_gguf(tmp_path / "m.gguf", "rwkv7"), tmp_path, "GGUF architecture 'rwkv7'")
    assert "cannot be read by transformers" in msg and "llama" in msg and "general" not in msg


def test_encoder_decoder_gguf_is_refused(tmp_path):
    refused(write_gguf(tmp_path / "m.gguf", "t5"), tmp_path, "encoder-decoder")


def test_corrupt_gguf_is_refused(tmp_path):
    good = write_gguf(tmp_path / "m.gguf", "llama").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(good[:40])
    refused(tmp_path / "cut.gguf", tmp_path, "cannot read GGUF file")
    (tmp_path / "fake.gguf").write_bytes(b"not gguf at all")
    refused(tmp_path / "fake.gguf", tmp_path, "does not start with the GGUF magic")


def test_gguf_file_option_errors(tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    write_gguf(folder / "a.gguf", "rwkv7")
    refused(folder, tmp_path, r"no config.json.*a.gguf: pick one with --gguf-file")
    refused(folder, tmp_path, "has no GGUF file b.gguf", gguf_file="b.gguf")
    refused(folder / "a.gguf", tmp_path, "pass the GGUF file itself", gguf_file="a.gguf")
    refused(folder, tmp_path, "GGUF architecture 'rwkv7'", gguf_file="a.gguf")  # the named file is read
    refused("someorg/some-model-GGUF", tmp_path, r"HF_HUB_OFFLINE=1", gguf_file="m.gguf")


def test_cli_prints_one_line(tmp_path):
    src = write_gguf(tmp_path / "m.gguf", "rwkv7")
    p = subprocess.run([str(CARD_CONVERT), str(src), str(tmp_path / "dst")], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error: GGUF architecture 'rwkv7'") and len(p.stderr.strip().splitlines()) == 1


def test_model_path_says_how_to_fetch_a_missing_or_altered_model(tmp_path, monkeypatch):
    from card.models import model_info, model_path

    monkeypatch.setenv("CARD_CACHE_DIR", str(tmp_path))
    with pytest.raises(CardError, match=r"card fetch-model smollm2-135m-instruct` \(or `make models`\)"):
        model_path("smollm2-135m-instruct")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / model_info("smollm2-135m-instruct").filename).write_bytes(b"partial")
    assert model_path("smollm2-135m-instruct").name.endswith(".gguf")  # found; sha256 only checked on request
    with pytest.raises(CardError, match="wrong sha256"):
        model_path("smollm2-135m-instruct", check=True)
    with pytest.raises(CardError, match="unknown model 'nope'; known: smollm2-135m-instruct"):
        model_path("nope")
