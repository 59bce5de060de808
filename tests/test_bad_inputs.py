"""Bad and hostile input through the real `card` CLI: one line on stderr, no traceback, nothing left behind.

Each case in ``CASES`` is a command line, run in-process through the real typer app with file-descriptor
capture (so warnings and progress bars on fd 2 count too), in one shared workspace whose whole tree is
hashed before and after: a case may add only the paths it promises and may change nothing that was there.
A few cases run as real subprocesses (the console script, a fresh interpreter), and a real ``card-convert``
is killed with SIGKILL mid-write to show that the next conversion leaves no temporary folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import transformers as tf
import yaml

from card.cli import app
from card.io import MARKER
from tests import factory

CARD = Path(sys.executable).parent / "card"
LONG_PROMPT = "Once upon a time " * 80  # > 256 positions of the tiny models


# ------------------------------------------------------------------------------------------ workspace
def _save(model, tok, path: Path) -> Path:
    model.save_pretrained(path)
    if tok is not None:
        tok.save_pretrained(path)
    return path


def _make_unwritable(d: Path) -> bool:
    """chmod 0555, and as root (which ignores modes) the immutable attribute; True if writes now fail."""
    d.mkdir()
    d.chmod(0o555)
    if os.geteuid() == 0 and shutil.which("chattr"):
        subprocess.run(["chattr", "+i", str(d)], capture_output=True)
    try:
        (d / "probe").mkdir()
    except OSError:
        return True
    (d / "probe").rmdir()
    return False


def _release(d: Path) -> None:
    if shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(d)], capture_output=True)
    d.chmod(0o755)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The workspace every case runs in (as its current directory), with every bad input prepared."""
    from card.convert import convert

    w = tmp_path_factory.mktemp("bad-inputs")
    src = factory.save_tiny_checkpoint(w / "src", "llama")
    convert(str(src), w / "ck")
    factory.save_tiny_checkpoint(w / "gpt2-notok", "gpt2", tokenizer=False)
    factory.save_tiny_checkpoint(w / "bart", factory.ENCODER_DECODER)
    _, tok = factory.tiny_model("llama")
    bert_cfg = factory._config(factory.ENCODER_ONLY, len(tok), tok)
    torch.manual_seed(0)
    _save(tf.BertModel(bert_cfg), tok, w / "bert")  # a plain encoder, as a user would download one
    model, tok = factory.tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] = float("nan")
    _save(model, tok, w / "nan-src")
    shutil.copytree(src, w / "nest" / "model")
    (w / "dangling").symlink_to(w / "gone")
    (w / "pfile").write_text("a regular file\n")
    (w / "afile").write_text("another regular file\n")
    (w / "existing").mkdir()
    (w / "existing" / "keep.txt").write_text("an earlier result\n")
    (w / "good").mkdir()
    (w / "good" / "results.json").write_text(json.dumps({"card_eval_version": 1, "runs": []}))
    for name, doc in {"shape-dict": {"a": 1}, "shape-list": [1, 2], "shape-run": {"runs": [{"foo": 1}]}}.items():
        (w / name).mkdir()
        (w / name / "results.json").write_text(json.dumps(doc))
    writable_ro = not _make_unwritable(w / "ro")

    stories = [f"Story {i}. Once upon a time there was a cat named Tom number {i} who liked milk." for i in range(60)]
    (w / "corpus.txt").write_text("\n\n".join(stories) + "\n")
    (w / "bad-utf8.txt").write_bytes((w / "corpus.txt").read_bytes() + b"caf\xe9\n\n")
    (w / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (w / "bad.jsonl").write_text('{"text": "ok"}\n{not json}\n{"text": "fine"}\n')
    (w / "r.yaml").write_text(yaml.safe_dump({
        "model": "ck", "data": {"path": "corpus.txt", "validation_fraction": 0.1},
        "train": {"seq_len": 32, "micro_batch_size": 2, "max_steps": 2, "precision": "fp32"}}))
    w_info = {"ro_writable": writable_ro}
    yield w, w_info
    _release(w / "ro")


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` -> a fingerprint (sha256 of a file, a link's target, or 'dir')."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_in_process(args: list[str], capfd) -> tuple[int, str, str, BaseException | None]:
    """The real ``card`` app on ``args``; (exit code, stdout, stderr, an exception that escaped)."""
    capfd.readouterr()
    code, escaped = 0, None
    try:
        app(args, prog_name="card")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:  # a bug: the CLI let an exception through
        code, escaped = 1, e
    out, err = capfd.readouterr()
    return code, out, err, escaped


_PROGRESS = re.compile(r"^[^|]*: *\d+%\|.*\| *\d+/\d+ \[")  # a tqdm bar ("Loading weights: 100%|███| 21/21 [...")


def message_lines(stderr: str) -> list[str]:
    """The non-empty lines of ``stderr``, less progress bars (transient on a terminal: they redraw with \\r)."""
    parts = re.split(r"[\r\n]", stderr)
    return [p for p in parts if p.strip() and not _PROGRESS.match(p)]


# -------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    id: str
    args: list[str]
    message: str  # regex the one stderr line must match
    promises: tuple[str, ...] = ()  # paths (globs) the command may add; a case with promises must succeed
    stdout_empty: bool = True
    quiet: bool = True  # fails before any work: stderr is the error line alone (else progress lines may precede it)
    needs_unwritable: bool = False
    tags: dict = field(default_factory=dict)


CASES = [
    # ------------------------------------------------------------------ issue items 5: unusable output paths
    Case("convert-into-a-file", ["convert", "src", "pfile/sub"], r"pfile/sub: cannot create it, .*pfile is a file"),
    Case("convert-unwritable-parent", ["convert", "src", "ro/dst"], r"ro/dst: cannot write in .*ro \(",
         needs_unwritable=True),
    Case("convert-current-dir", ["convert", "src", ".", "--overwrite"], r"destination \. is the current directory"),
    Case("convert-parent-of-cwd", ["convert", "src", "..", "--overwrite"], r"contains the current directory"),
    Case("adapt-output-dir-is-a-file", ["adapt", "r.yaml", "--output-dir", "afile"],
         r"recipe key output_dir: .*afile exists and is not a directory"),
    Case("adapt-output-dir-unwritable", ["adapt", "r.yaml", "--output-dir", "ro"],
         r"recipe key output_dir: .*ro: cannot write in", needs_unwritable=True),
    Case("adapt-output-dir-unwritable-parent", ["adapt", "r.yaml", "--output-dir", "ro/run"],
         r"recipe key output_dir: .*ro/run: cannot write in", needs_unwritable=True),
    # ---------------------------------------------------------------- issue item 7: results of the wrong shape
    Case("report-results-a-dict-of-nothing", ["report", "shape-dict", "--out", "merged"], r"shape-dict.*results"),
    Case("report-results-a-list", ["report", "shape-list", "--out", "merged"], r"shape-list.*results"),
    Case("report-results-run-without-fields", ["report", "shape-run", "--out", "merged"], r"shape-run.*results"),
    Case("report-out-is-a-file", ["report", "good", "--out", "afile"], r"--out afile exists and is not a directory"),
    # ---------------------------------------------------------------------------- "also found" list
    Case("eval-out-exists", ["eval", "ck", "--tasks", "card_piqa", "--out", "existing"],
         r"--out existing already exists; pass --overwrite"),
    Case("report-out-is-its-input", ["report", "good", "--out", "good"], r"--out good is also an input"),
    Case("report-out-is-its-input-overwrite", ["report", "good", "--out", "good", "--overwrite"],
         r"--out good is also an input"),
    Case("convert-onto-its-source", ["convert", "src", "src", "--overwrite"], r"destination src is also an input"),
    Case("recipe-is-a-folder", ["adapt", "good"], r"recipe good is a directory; pass a YAML recipe file"),
    Case("convert-dangling-symlink", ["convert", "dangling", "out"], r"source dangling is a symbolic link to .*gone"),
    Case("convert-nan-weights", ["convert", "nan-src", "out"],
         r"source nan-src is not usable: weight model\.layers\.0\.mlp\.up_proj\.weight holds NaN"),
    Case("generate-prompt-too-long", ["generate", "ck", LONG_PROMPT, "--max-new-tokens", "8"],
         r"prompt 0 \(\d+ tokens\) \+ max new tokens \(8\) exceeds the model's 256 positions"),
    # ----------------------------------------------------------------------- issue items 2, 3, 4, 6, 9-11
    Case("adapt-ar-on-an-encoder", ["adapt", "r.yaml", "--set", "model=bert", "--set", "objective.kind=ar",
                                    "--set", "data.separator=none", "--set", "train.seq_len=64"],
         r"recipe key model: .*bert checkpoint is a BertModel, not a causal LM"),
    Case("adapt-ar-on-a-seq2seq", ["adapt", "r.yaml", "--set", "model=bart", "--set", "objective.kind=ar",
                                   "--set", "data.separator=none"],
         r"recipe key model: .*bart is an encoder-decoder model"),
    Case("adapt-non-utf8-text", ["adapt", "r.yaml", "--set", "data.path=bad-utf8.txt"],
         r"recipe key data\.path: .*bad-utf8\.txt line 120 is not UTF-8 text \(byte 0xe9 at column 4\)", quiet=False),
    Case("adapt-binary-text", ["adapt", "r.yaml", "--set", "data.path=binary.txt"],
         r"recipe key data\.path: .*binary\.txt line \d+ is not UTF-8 text \(byte 0x80", quiet=False),
    Case("adapt-malformed-jsonl", ["adapt", "r.yaml", "--set", "data.path=bad.jsonl"],
         r"recipe key data\.path: .*bad\.jsonl line 2 is not valid JSON", quiet=False),
    Case("convert-gpt2-without-tokenizer", ["convert", "gpt2-notok", "out"],
         r"gpt2-notok has no usable tokenizer \(it encodes text to no tokens"),
    Case("convert-mask-token-eos", ["convert", "src", "out", "--mask-token", "</s>"],
         r"--mask-token '</s>' is the tokenizer's eos token, which the model already uses"),
    Case("convert-mask-token-bos", ["convert", "src", "out", "--mask-token", "<s>"],
         r"--mask-token '<s>' is the tokenizer's bos token"),
    Case("demo-missing-model", ["demo", "--model", "/nonexist", "--data", "corpus.txt", "--out", "o2", "--quick"],
         r"source /nonexist does not exist", quiet=False),
    Case("demo-missing-model-again", ["demo", "--model", "/nonexist", "--data", "corpus.txt", "--out", "o2", "--quick"],
         r"source /nonexist does not exist", quiet=False),  # the retry meets the same error, not "o2 already exists"
    Case("demo-fails-after-step-1", ["demo", "--model", "src", "--data", "bad-utf8.txt", "--out", "o3", "--quick"],
         r"recipe key data\.path: .*bad-utf8\.txt line 120 is not UTF-8", stdout_empty=False, quiet=False),
    Case("demo-overwrite-fails-keeps-old", ["demo", "--model", "/nonexist", "--data", "corpus.txt", "--out", "existing",
                                            "--overwrite", "--quick"], r"source /nonexist does not exist", quiet=False),
    Case("demo-nproc-0", ["demo", "--quick", "--nproc-per-node", "0"], r"need --nproc-per-node >= 1 \(got 0\)"),
    Case("adapt-nproc-0", ["adapt", "r.yaml", "--nproc-per-node", "0"], r"need --nproc-per-node >= 1"),
    # ------------------------------------------------------------------------------------- our own
    Case("convert-existing-no-overwrite", ["convert", "src", "existing"], r"already exists; pass --overwrite"),
    Case("convert-onto-a-file-overwrite", ["convert", "src", "afile", "--overwrite"], r"exists and is not a directory"),
    Case("convert-over-a-folder-holding-the-source", ["convert", "nest/model", "nest", "--overwrite"],
         r"destination nest contains the input nest/model"),
    Case("convert-encoder", ["convert", "bert", "out"], r"bert checkpoint is a BertModel, not a causal LM"),
    Case("convert-unknown-mask-token", ["convert", "src", "out", "--mask-token", "<nope>"], r"is not in the tokenizer"),
    Case("adapt-output-dir-is-the-model", ["adapt", "r.yaml", "--output-dir", "ck"],
         r"recipe key output_dir: .*ck is also an input"),
    Case("adapt-output-dir-current-dir", ["adapt", "r.yaml", "--output-dir", "."], r"is the current directory"),
    Case("eval-out-is-the-checkpoint", ["eval", "ck", "--tasks", "card_piqa", "--out", "ck", "--overwrite"],
         r"--out ck is also an input"),
    Case("eval-out-into-a-file", ["eval", "ck", "--tasks", "card_piqa", "--out", "pfile/x"], r"pfile is a file"),
    Case("demo-out-current-dir", ["demo", "--quick", "--out", ".", "--overwrite"], r"--out \. is the current directory"),
    Case("generate-encoder", ["generate", "bert", "hi"], r"bert checkpoint is a BertModel, not a causal LM"),
    # ----------------------------------------------------------------- right behaviour is success
    Case("convert-creates-missing-parents", ["convert", "src", "new/deeper/ck2"], r"",
         promises=("new", "new/deeper", "new/deeper/ck2", "new/deeper/ck2/*")),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_one_line_and_leaves_nothing(case: Case, ws, capfd, monkeypatch, one_thread):
    w, info = ws
    if case.needs_unwritable and info["ro_writable"]:
        pytest.skip("cannot make a folder unwritable here (root without chattr)")
    monkeypatch.chdir(w)
    monkeypatch.setenv("CARD_CACHE_DIR", str(w / "cache"))
    before = snapshot(w)
    code, out, err, escaped = run_in_process(case.args, capfd)
    after = snapshot(w)
    assert escaped is None, f"{type(escaped).__name__} escaped the CLI: {escaped}"
    assert "Traceback" not in err + out
    added = sorted(set(after) - set(before))
    if case.promises:
        assert code == 0, err
        assert all(any(Path(p).match(g) for g in case.promises) for p in added), added
        assert added, "the promised output is missing"
        ck = w / case.promises[2]
        assert (ck / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~_umask()  # like every other output
        shutil.rmtree(w / case.promises[0])
    else:
        lines = message_lines(err)
        assert code != 0
        assert len(lines) == 1 if case.quiet else lines, err
        assert [line for line in lines if line.startswith("error")] == lines[-1:], err  # one error line, the last
        assert lines[-1].startswith("error: ") and re.search(case.message, lines[-1]), lines[-1]
        if case.stdout_empty:
            assert not out.strip(), out  # e.g. the too-long prompt is not echoed before the refusal
        assert not added, f"left behind: {added}"
    changed = sorted(p for p in before if p in after and before[p] != after[p])
    removed = sorted(set(before) - set(after))
    assert not changed and not removed, (changed, removed)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------ real processes
@pytest.mark.parametrize("args, message", [
    (["convert", "gpt2-notok", "out"], r"has no usable tokenizer"),
    (["adapt", "r.yaml", "--set", "data.path=bad.jsonl"], r"bad\.jsonl line 2 is not valid JSON"),
], ids=["convert", "adapt"])
def test_real_console_script_prints_one_line(args, message, ws):
    """The console script in a fresh interpreter: import-time warnings and progress bars would show here."""
    w, _ = ws
    before = snapshot(w)
    env = {**os.environ, "CARD_CACHE_DIR": str(w / "cache")}
    p = subprocess.run([str(CARD), *args], cwd=w, capture_output=True, text=True, timeout=300, env=env)
    lines = message_lines(p.stderr)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert [line for line in lines if line.startswith("error")] == lines[-1:] and re.search(message, lines[-1]), p.stderr
    assert snapshot(w) == before


def _big_source(path: Path) -> Path:
    """A Llama of about 13M parameters (50 MB in fp32): a conversion takes seconds, so a kill lands mid-write."""
    _, tok = factory.tiny_model("llama")
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=1024, num_hidden_layers=12,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    return _save(tf.LlamaForCausalLM(cfg), tok, path)


def _ours(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_sigkill_during_conversion_then_next_conversion_leaves_no_temporary_folder(tmp_path):
    src = _big_source(tmp_path / "big")
    dst = tmp_path / "dst"
    proc = subprocess.Popen([str(CARD), "convert", str(src), str(dst)], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    killed = False
    while time.monotonic() < deadline and proc.poll() is None:
        tmps = [tmp_path / n for n in _ours(tmp_path, "dst")]
        if any(len(list(t.iterdir())) > 1 for t in tmps if t.is_dir()):  # the marker and a first file
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.005)
    proc.wait()
    assert killed, "the conversion finished before it could be killed"
    debris = _ours(tmp_path, "dst")
    assert debris and not dst.exists()  # what the kill leaves: a marked temporary folder, no destination

    # A foreign folder with our name pattern but no marker is not ours, and stays.
    (tmp_path / ".dst.tmp-someone-else").mkdir()
    from card.convert import convert

    report = convert(str(src), dst, verify=False)
    assert report.dst == str(dst) and (dst / "model.safetensors").exists() and not (dst / MARKER).exists()
    assert _ours(tmp_path, "dst") == [".dst.tmp-someone-else"]


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _plant(folder: Path, pid: int, start=None) -> Path:
    import socket

    folder.mkdir(parents=True)
    (folder / MARKER).write_text(json.dumps({"tool": "card", "pid": pid, "start": start, "host": socket.gethostname()}))
    return folder


def test_sweep_removes_only_stale_folders_of_ours_and_restores_a_swapped_out_copy(tmp_path):
    from card.io import _start_time, sweep_stale

    dst = tmp_path / "out"
    dead = _dead_pid()
    _plant(tmp_path / ".out.tmp-dead", dead)
    live = _plant(tmp_path / ".out.tmp-live", os.getpid(), _start_time(os.getpid()))  # a run still writing
    (tmp_path / ".out.tmp-foreign").mkdir()  # our name pattern, no marker: not provably ours
    old = _plant(tmp_path / ".out.old-dead", dead)  # killed between the two renames of a swap
    (old / "out").mkdir()
    (old / "out" / "weights").write_text("the complete earlier copy")
    (tmp_path / ".other.tmp-x").mkdir()  # another destination's
    removed = sweep_stale(dst)
    assert sorted(p.name for p in removed) == [".out.old-dead", ".out.tmp-dead"]
    assert (dst / "weights").read_text() == "the complete earlier copy"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-x", ".out.tmp-foreign", ".out.tmp-live", "out"]
    assert live.is_dir()


def test_staged_directory_killed_run_is_cleared_by_the_next_claim(tmp_path):
    """``card demo`` writes at its final paths: a killed run's folder carries a stale marker and goes."""
    from card.errors import CardError
    from card.io import staged_directory

    out = _plant(tmp_path / "demo", _dead_pid())
    (out / "partial.bin").write_text("half")
    with staged_directory(out) as d:
        (d / "result").write_text("whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    assert sorted(p.name for p in out.iterdir()) == ["result"]
    with pytest.raises(CardError, match="already exists; pass --overwrite"):
        with staged_directory(out):
            pass
    with pytest.raises(RuntimeError):
        with staged_directory(out, overwrite=True) as d:
            (d / "new").write_text("x")
            raise RuntimeError("failed midway")
    assert sorted(p.name for p in out.iterdir()) == ["result"] and sorted(os.listdir(tmp_path)) == ["demo"]
