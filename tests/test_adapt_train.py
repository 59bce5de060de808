"""card adapt end to end: real DeepSpeed (2 processes over gloo through the real `card adapt` CLI, and
1 process in-process), the real converted stories260K and the real TinyStories text. No mocks.

Each 2-rank launch costs ~15 s of fixed overhead, so every launch serves several assertions.
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
from pathlib import Path

import psutil
import pytest
import torch
import transformers as tf

from card.adapt import load_recipe
from card.adapt.data import load_data, tokenizer_fingerprint
from card.adapt.objective import ar_loss
from card.metadata import read_metadata

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "stories260k-cpu.yaml"
CARD = Path(sys.executable).parent / "card"
TRAIN_KEYS = {"step", "split", "loss", "ar_loss", "corrupt_ce", "mask_ratio", "lr", "grad_norm", "tokens",
              "tokens_per_second", "elapsed"}




@pytest.fixture(scope="module")
def env(tmp_path_factory, data_dir) -> dict:
    return {**os.environ, "CARD_CACHE_DIR": str(tmp_path_factory.mktemp("card-cache")), "CARD_DATA_DIR": str(data_dir)}


@pytest.fixture(scope="module")
def stories_txt(data_dir) -> Path:
    return data_dir / "tinystories" / "tinystories_v1_validation_first_stories.txt"


def card_adapt(args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(CARD), "adapt", *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, p.stderr[-4000:]
    return p


def metrics(run: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x["split"] == "train"], [x for x in lines if x["split"] == "validation"]


def validation_ar_loss(model_dir: Path, run: Path, env: dict) -> float:
    """Clean AR loss of a checkpoint on a run's validation rows (token-weighted, as the trainer computes it)."""
    recipe = load_recipe(run / "recipe.yaml", [f"data.cache_dir={env['CARD_CACHE_DIR']}/data"])
    tok = tf.AutoTokenizer.from_pretrained(recipe.model)
    data = load_data(recipe.data, tok, recipe.train.seq_len, "bos", tokenizer_fingerprint(recipe.model), log=lambda m: None)
    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total = n = 0.0
    for i in range(0, len(data.validation), 8):
        b = data.validation.batch(list(range(i, min(i + 8, len(data.validation)))))
        loss, k = ar_loss(model, b.ids, b.valid)
        total, n = total + loss * k, n + k
    return total / n


def test_zero3_two_processes_cli(stories_card, stories_txt, env, tmp_path):
    """The issue's command, verbatim: ZeRO-3 over 2 CPU processes; loss falls, the checkpoint is saved,
    and the consolidated final checkpoint reloads with plain transformers and holds the engine's weights."""
    run = tmp_path / "run"
    t0 = time.perf_counter()
    p = ok(card_adapt(["recipes/stories260k-cpu.yaml", "--set", f"model={stories_card}", "--set", f"data.path={stories_txt}",
                       "--set", "train.max_steps=30", "--set", "deepspeed=recipes/deepspeed/zero3.json",
                       "--nproc-per-node", "2", "--output-dir", run], env))
    seconds = time.perf_counter() - t0
    assert f"final checkpoint: {run / 'final'}" in p.stdout
    assert "torch.distributed.run --nproc_per_node 2" in p.stderr  # the launcher ran torchrun

    train, val = metrics(run)
    assert [x["step"] for x in train] == [10, 20, 30] and all(TRAIN_KEYS <= set(x) for x in train)
    assert train[-1]["tokens"] == 30 * 2 * 8 * 256  # 2 ranks x micro-batch 8 x 256 tokens per step
    assert all(x["tokens_per_second"] > 0 and 0 < x["mask_ratio"] < 1 for x in train)
    assert [x["step"] for x in val] == [0, 30]
    assert val[1]["val_loss"] < val[0]["val_loss"] - 0.2  # the CARD loss falls (fixed validation masks)
    assert (run / "tensorboard").is_dir() and any((run / "tensorboard").iterdir())

    ck = run / "checkpoints"
    assert (ck / "latest").read_text().strip() == "step30"
    for r in (0, 1):  # ZeRO-3 shards of parameters and optimizer state, one per rank
        assert (ck / "step30" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").exists()
        assert (ck / "step30" / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").exists()
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_batch_size"] == 16 and ds["bf16"] == {"enabled": False}

    final = run / "final"
    model = tf.AutoModelForCausalLM.from_pretrained(final)
    tok = tf.AutoTokenizer.from_pretrained(final)
    meta = read_metadata(model.config)
    source_meta = read_metadata(tf.AutoConfig.from_pretrained(stories_card))
    assert meta.mask_token_id == source_meta.mask_token_id == tok.mask_token_id
    assert len(meta.adaptation) == 1
    rec = meta.adaptation[0]
    assert rec["steps"] == 30 and rec["world_size"] == 2 and rec["zero_stage"] == 3 and rec["recipe"] == "stories260k-cpu"
    assert rec["tokens"] == train[-1]["tokens"] and rec["final"]["val_ar_loss"] == val[-1]["val_ar_loss"]
    assert model.dtype == torch.float32 and model.config.tie_word_embeddings
    source = tf.AutoModelForCausalLM.from_pretrained(stories_card)
    assert not torch.equal(model.model.embed_tokens.weight, source.model.embed_tokens.weight)  # it trained
    # Consolidation is right: the reloaded weights give the engine's own final validation AR loss.
    assert validation_ar_loss(final, run, env) == pytest.approx(val[-1]["val_ar_loss"], abs=1e-5)
    print(f"\nZeRO-3 2 ranks: {seconds:.1f}s wall, {train[-1]['tokens_per_second']} tok/s, val_loss "
          f"{val[0]['val_loss']:.4f} -> {val[-1]['val_loss']:.4f}")


def _tree(pid: int) -> list[psutil.Process]:
    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _snapshot(d: Path) -> dict:
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.rglob("*")) if f.is_file()}


def test_zero2_kill_resume_and_nan(stories_card, env, tmp_path):
    """ZeRO-2 over 2 processes. A run killed with SIGKILL after a checkpoint, then resumed, logs the same
    losses as an uninterrupted run; a NaN loss (a resume with lr 1e10) stops the run with one line and
    leaves the last good checkpoint as it was."""
    args = ["recipes/stories260k-cpu.yaml", "--set", f"model={stories_card}", "--set", "deepspeed=recipes/deepspeed/zero2.json",
            "--set", "train.max_steps=20", "--set", "train.seq_len=64", "--set", "train.micro_batch_size=4",
            "--set", "train.save_every=4", "--set", "train.log_every=1", "--set", "train.eval_every=0",
            "--set", "train.warmup_steps=0", "--set", "data.max_validation_blocks=4", "--nproc-per-node", "2"]
    full, killed = tmp_path / "full", tmp_path / "killed"

    # 1. uninterrupted
    ok(card_adapt([*args, "--output-dir", full], env))
    reference, _ = metrics(full)
    assert [x["step"] for x in reference] == list(range(1, 21))
    assert sorted(p.name for p in (full / "checkpoints").glob("step*")) == ["step16", "step20"]  # save_total_limit 2

    # 2. killed with SIGKILL once a checkpoint exists
    proc = subprocess.Popen([str(CARD), "adapt", *map(str, args), "--output-dir", str(killed)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tree: list[psutil.Process] = []
    try:
        deadline = time.time() + 240
        while not (killed / "checkpoints" / "latest").exists():
            assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            tree = _tree(proc.pid) or tree
            time.sleep(0.02)
        tree = _tree(proc.pid) or tree
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # the launcher's death takes torchrun and the workers with it (no orphan goes on training)
        gone, alive = psutil.wait_procs(tree, timeout=20)
        assert not alive, f"orphans: {alive}"
    finally:
        for p in _tree(proc.pid)[1:] + tree:
            if p.is_running():
                p.kill()
    tag = (killed / "checkpoints" / "latest").read_text().strip()
    resumed_at = int(tag.removeprefix("step"))
    assert not (killed / "final").exists() and resumed_at < 20
    good = killed / "checkpoints" / tag
    before = _snapshot(good)

    # 3. a resume that diverges: stops at once with one line, no traceback, checkpoint untouched
    p = card_adapt([*args, "--set", "train.lr=1e10", "--output-dir", killed], env)
    assert p.returncode == 2, p.stderr[-3000:]
    errors = [x for x in p.stderr.splitlines() if x.startswith("error")]
    assert len(errors) == 1, p.stderr[-3000:]
    assert re.match(rf"error: loss became (nan|inf) at step {resumed_at + 2}; stopping\. Last good checkpoint: "
                    rf"{re.escape(str(good))} \(rank \d, exit code 2\)$", errors[0]), errors[0]
    assert "Traceback" not in p.stderr and "ChildFailedError" not in p.stderr
    assert (killed / "checkpoints" / "latest").read_text().strip() == tag and _snapshot(good) == before
    assert not (killed / "final").exists()

    # 4. the real resume: the same losses as the uninterrupted run
    p = ok(card_adapt([*args, "--output-dir", killed], env))
    assert f"resuming from {good} at step {resumed_at}" in p.stderr
    again, _ = metrics(killed)
    assert [x["step"] for x in again] == list(range(1, 21))  # lines of the killed and the failed attempts were dropped
    for a, b in zip(again, reference):
        for k in ("loss", "ar_loss", "corrupt_ce", "mask_ratio", "lr", "grad_norm"):
            assert a[k] == pytest.approx(b[k], abs=1e-5), (a["step"], k)
    assert (killed / "final" / "model.safetensors").exists()
    a = tf.AutoModelForCausalLM.from_pretrained(full / "final").state_dict()
    b = tf.AutoModelForCausalLM.from_pretrained(killed / "final").state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_stories260k_adaptation_keeps_ar_quality(stories_card, data_dir, env, tmp_path):
    """A few hundred steps of the real stories260K in one process (in-process DeepSpeed, ZeRO-2): the CARD
    loss falls and the clean AR validation loss stays within 10% of the unconverted model's."""
    run = tmp_path / "run"
    steps = 300
    t0 = time.perf_counter()
    # One thread: on a shared 2-core machine, a 2-thread OpenMP process slows down by 10x whenever another
    # process takes a core; alone, one thread costs about half the speed.
    ok(card_adapt(["recipes/stories260k-cpu.yaml", "--set", f"model={stories_card}", "--set", f"train.max_steps={steps}",
                   "--set", "train.seq_len=128", "--set", "train.eval_every=100", "--set", "train.save_every=0",
                   "--set", "train.log_every=10", "--set", "data.max_validation_blocks=48", "--output-dir", run],
                  {**env, "OMP_NUM_THREADS": "1"}, timeout=600))
    seconds = time.perf_counter() - t0
    train, val = metrics(run)
    assert [x["step"] for x in val] == [0, 100, 200, 300]
    unconverted = validation_ar_loss(data_dir / "stories260K_hf", run, env)
    assert val[0]["val_ar_loss"] == pytest.approx(unconverted, abs=1e-4)  # conversion kept the AR model
    # The CARD loss falls: most of it in the first tens of steps (the model learns to read the mask token),
    # then slowly. The validation loss uses fixed masks, so it is the clean measure; per-step training losses
    # vary by +-0.3 with each batch's noise levels, so they are averaged.
    mean = lambda xs, k: sum(x[k] for x in xs) / len(xs)  # noqa: E731
    last = train[-10:]
    assert val[-1]["val_loss"] < 0.85 * val[0]["val_loss"] and val[-1]["val_loss"] < val[1]["val_loss"]
    assert mean(last, "loss") < val[0]["val_loss"] - 0.5
    assert val[-1]["val_ar_loss"] < 1.10 * unconverted  # AR quality kept within 10%
    adapted = validation_ar_loss(run / "final", run, env)
    assert adapted == pytest.approx(val[-1]["val_ar_loss"], abs=1e-5)
    report = {"steps": steps, "seconds": round(seconds, 1), "card_loss_train_last10": round(mean(last, "loss"), 4),
              "val_card_loss": [x["val_loss"] for x in val], "val_ar_loss": [x["val_ar_loss"] for x in val],
              "val_ar_unconverted": round(unconverted, 4), "val_ar_adapted": round(adapted, 4),
              "tokens_per_second": train[-1]["tokens_per_second"]}
    print("\nstories260K adaptation:", json.dumps(report))
    out = os.environ.get("CARD_ADAPT_REPORT")
    if out:
        Path(out).write_text(json.dumps(report, indent=1))
    shutil.rmtree(run / "checkpoints")  # keep tmp small


def test_prompt_completion_masks_only_answers(stories_card, env, tmp_path):
    """The path the end-to-end demo takes: prompt/completion records with masks confined to the answers,
    gradient accumulation and a constant schedule, in one process (API and CLI share the in-process path)."""
    names, colors = ["Tom", "Lily", "Ben", "Mia", "Sam", "Anna"], ["red", "blue", "green", "yellow", "pink"]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(
        json.dumps({"prompt": f"{n} had a {c} ball. He played with it all day in the park. What color was the ball? It was",
                    "completion": f" {c}."}) + "\n" for n in names for c in colors) * 2)
    run = tmp_path / "run"
    ok(card_adapt(["recipes/stories260k-cpu.yaml", "--set", f"model={stories_card}", "--set", f"data.path={qa}",
                   "--set", "data.prompt_field=prompt", "--set", "data.completion_field=completion",
                   "--set", "data.separator=eos", "--set", "data.validation_fraction=0.1",
                   "--set", "objective.mask_scope=completion", "--set", "train.seq_len=48",
                   "--set", "train.micro_batch_size=4", "--set", "train.gradient_accumulation_steps=2",
                   "--set", "train.max_steps=12", "--set", "train.log_every=1", "--set", "train.lr_schedule=constant",
                   "--set", "train.warmup_steps=0", "--output-dir", run], {**env, "OMP_NUM_THREADS": "1"}))
    train, val = metrics(run)
    assert len(train) == 12 and [x["step"] for x in val] == [0, 12]
    assert all(x["lr"] == pytest.approx(1e-3) for x in train)  # constant schedule
    # masks only hit the answer and its EOS (<= 5 of the ~45 real tokens of a row), never the prompt
    assert all(0 < x["mask_ratio"] <= 5 / 40 for x in train)
    assert train[-1]["tokens"] < 12 * 2 * 4 * 48  # padded rows: only real tokens count
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    assert tf.AutoModelForCausalLM.from_pretrained(run / "final") is not None


def test_plain_ar_objective_trains_an_unconverted_checkpoint(tiny_ckpt, stories_txt, env, tmp_path):
    """objective.kind: ar is ordinary next-token training on the same engine (the demo's AR pre-training and the
    plain-AR baselines): it accepts a checkpoint without a mask token and leaves it a plain checkpoint."""
    run = tmp_path / "run"
    ok(card_adapt(["recipes/stories260k-cpu.yaml", "--set", f"model={tiny_ckpt('llama')}", "--set", f"data.path={stories_txt}",
                   "--set", "objective.kind=ar", "--set", "data.separator=eos", "--set", "train.seq_len=64",
                   "--set", "train.max_steps=30", "--set", "train.log_every=1", "--set", "train.lr=3e-3",
                   "--set", "data.max_validation_blocks=8", "--output-dir", run], {**env, "OMP_NUM_THREADS": "1"}))
    train, val = metrics(run)
    assert all(x["mask_ratio"] == 0 and x["ar_loss"] == pytest.approx(x["loss"], rel=1e-6) for x in train)
    assert all(x["val_loss"] == x["val_ar_loss"] for x in val)
    assert val[-1]["val_ar_loss"] < val[0]["val_ar_loss"] - 0.5  # a random model learns the text
    final = tf.AutoModelForCausalLM.from_pretrained(run / "final")
    assert read_metadata(final.config) is None
