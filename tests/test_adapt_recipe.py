"""card.adapt recipes: schema, overrides, env expansion, path rules, DeepSpeed "auto" filling, and bad
recipes failing fast with one line that names the key path (through the real `card adapt` CLI)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from card.adapt import load_recipe
from card.adapt.recipe import Recipe
from card.adapt.resolve import build_ds_config, lr_factor
from card.cli import app
from card.convert import convert
from card.errors import CardError

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"


@pytest.fixture(scope="module")
def card_tiny(tiny_ckpt, tmp_path_factory) -> Path:
    """A converted tiny Llama (max 256 positions)."""
    dst = tmp_path_factory.mktemp("card-tiny") / "ckpt"
    convert(str(tiny_ckpt("llama")), dst)
    return dst


@pytest.fixture
def text_file(tmp_path) -> Path:
    f = tmp_path / "corpus.txt"
    f.write_text("\n\n".join(f"Story {i}. Once upon a time there was a cat named Tom number {i}." for i in range(40)))
    return f


def write_recipe(path: Path, **raw) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(CardError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_shipped_recipes_are_valid(tmp_path, monkeypatch, data_dir):
    monkeypatch.setenv("CARD_DATA_DIR", str(data_dir))
    r = load_recipe(RECIPES / "stories260k-cpu.yaml", [f"model={tmp_path}"])
    assert r.data.path == str(data_dir / "tinystories" / "tinystories_v1_validation_first_stories.txt")
    assert r.deepspeed == str(RECIPES / "deepspeed" / "zero2.json")  # relative to the recipe file
    assert r.data.separator == "bos" and r.train.precision == "fp32"
    for name in ("qwen2.5-0.5b-1gpu.yaml", "llama3-8b-zero3-multinode.yaml"):
        assert "recipe key model: is required" in error_of(load_recipe, RECIPES / name)
        r = load_recipe(RECIPES / name, ["model=org/converted-model"])
        assert r.model == "org/converted-model" and Path(r.deepspeed).exists() and r.data.streaming
        assert (RECIPES / name).read_text().startswith("# NOT RUN HERE")
    for f in (RECIPES / "deepspeed").glob("*.json"):
        json.loads(f.read_text())


def test_stories_recipe_default_data_dir_is_beside_the_repo(tmp_path, monkeypatch):
    monkeypatch.delenv("CARD_DATA_DIR", raising=False)
    r = load_recipe(RECIPES / "stories260k-cpu.yaml", [f"model={tmp_path}", f"data.path={tmp_path}"])
    assert r.data.path == str(tmp_path)  # an override replaces the ${...} value before expansion
    if (REPO.parent / "shared" / "data").exists():
        r = load_recipe(RECIPES / "stories260k-cpu.yaml", [f"model={tmp_path}"])
        assert r.data.path.startswith(str((REPO.parent / "shared" / "data").resolve()))


def test_overrides_types_and_defaults(tmp_path, text_file):
    rec = write_recipe(tmp_path / "r.yaml", model=str(tmp_path), data={"path": str(text_file)}, train={"lr": "3e-4"})
    r = load_recipe(rec, ["train.max_steps=30", "train.betas=[0.9, 0.99]", "objective.beta=2", "data.separator=eos",
                          "train.lr_schedule=constant"])
    assert isinstance(r, Recipe)
    assert r.train.max_steps == 30 and r.train.lr == 3e-4 and r.train.betas == [0.9, 0.99]
    assert r.objective.beta == 2.0 and isinstance(r.objective.beta, float)
    assert r.data.separator == "eos" and r.train.lr_schedule == "constant"
    assert r.name == "r" and r.output_dir == str(Path.cwd() / "runs" / "r")
    assert load_recipe(rec, [], output_dir=str(tmp_path / "out")).output_dir == str(tmp_path / "out")


@pytest.mark.parametrize("override, expected", [
    ("data.pth=x", "unknown recipe key data.pth (did you mean data.path?)"),
    ("trian.lr=1", "unknown recipe key trian (did you mean train?)"),
    ("train.seq_len=abc", "recipe key train.seq_len: expected an integer, got 'abc'"),
    ("train.seq_len=1.5", "recipe key train.seq_len: expected an integer, got 1.5"),
    ("train.lr=fast", "recipe key train.lr: expected a number, got 'fast'"),
    ("data.streaming=3", "recipe key data.streaming: expected true or false, got 3"),
    ("train.lr_schedule=linear", "recipe key train.lr_schedule: expected one of cosine, constant, got 'linear'"),
    ("data.separator=eot", "recipe key data.separator: expected one of eos, bos, none or null, got 'eot'"),
    ("train.betas=0.9", "recipe key train.betas: expected a list of numbers, got 0.9"),
    ("train=5", "recipe key train: expected a mapping, got 5"),
    ("train.micro_batch_size=0", "recipe key train.micro_batch_size: must be >= 1, got 0"),
    ("train.seq_len=1", "recipe key train.seq_len: must be >= 2, got 1"),
    ("objective.tail_factor=0.5", "recipe key objective.tail_factor: must be >= 1, got 0.5"),
    ("data.validation_fraction=1", "recipe key data.validation_fraction: must be in [0, 1), got 1.0"),
    ("objective.mask_scope=completion", "recipe key objective.mask_scope: 'completion' needs data.prompt_field"),
    ("data.prompt_field=q", "recipe key data.completion_field: is required"),
    ("data.path=/no/such/file.txt", "recipe key data.path: no such file or directory: /no/such/file.txt"),
    ("data.validation_path=/no/such/val.txt", "recipe key data.validation_path: no such file or directory"),
    ("deepspeed=/no/such/ds.json", "recipe key deepspeed: no such file or directory: /no/such/ds.json"),
    ("model=/no/such/ckpt", "recipe key model: no such directory: /no/such/ckpt"),
    ("noequals", "--set expects key.sub=value, got 'noequals'"),
    ("decoding.threshold=0", "recipe key decoding.threshold: must be in (0, 1], got 0"),
    ("decoding.block_size=-1", "recipe key decoding.block_size: must be >= 0, got -1"),
    ("decoding.block=4", "unknown recipe key decoding.block (did you mean decoding.block_size?)"),
])
def test_bad_recipes_name_the_key(tmp_path, text_file, override, expected):
    rec = write_recipe(tmp_path / "r.yaml", model=str(tmp_path), data={"path": str(text_file)})
    assert expected in error_of(load_recipe, rec, [override])


def test_bad_yaml_and_missing_model(tmp_path, text_file):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    assert "is not valid YAML" in error_of(load_recipe, bad)
    assert "does not exist" in error_of(load_recipe, tmp_path / "missing.yaml")
    rec = write_recipe(tmp_path / "r.yaml", data={"path": str(text_file)})
    assert "recipe key model: is required" in error_of(load_recipe, rec)


def test_env_expansion(tmp_path, text_file, monkeypatch):
    rec = write_recipe(tmp_path / "r.yaml", model=str(tmp_path), data={"path": "${CARD_TEST_DIR}/corpus.txt"},
                       output_dir="${CARD_TEST_OUT:-out}/run")
    monkeypatch.delenv("CARD_TEST_DIR", raising=False)
    monkeypatch.delenv("CARD_TEST_OUT", raising=False)
    assert "recipe key data.path: environment variable CARD_TEST_DIR is not set" in error_of(load_recipe, rec)
    monkeypatch.setenv("CARD_TEST_DIR", str(text_file.parent))
    r = load_recipe(rec)
    assert r.data.path == str(text_file)
    assert r.output_dir == str(Path.cwd() / "out" / "run")


def test_relative_paths_follow_their_origin(tmp_path, text_file, monkeypatch):
    """Recipe-file paths are relative to the recipe; --set paths to the current directory."""
    sub = tmp_path / "recipes"
    sub.mkdir()
    (sub / "data.txt").write_text(text_file.read_text())
    (sub / "ds.json").write_text("{}")
    rec = write_recipe(sub / "r.yaml", model=str(tmp_path), deepspeed="ds.json", data={"path": "data.txt"})
    monkeypatch.chdir(tmp_path)
    r = load_recipe(rec)
    assert r.data.path == str(sub / "data.txt") and r.deepspeed == str(sub / "ds.json")
    r = load_recipe(rec, ["data.path=corpus.txt"])
    assert r.data.path == str(tmp_path / "corpus.txt")
    # a name that is no local path stays a hub id
    r = load_recipe(rec, ["data.path=roneneldan/TinyStories", "model=org/model"])
    assert r.data.path == "roneneldan/TinyStories" and r.model == "org/model"


def test_deepspeed_auto_values_are_filled_and_conflicts_named(tmp_path, text_file):
    rec = write_recipe(tmp_path / "r.yaml", model=str(tmp_path), data={"path": str(text_file)},
                       train={"micro_batch_size": 4, "gradient_accumulation_steps": 3, "grad_clip": 0.5, "lr": 2e-3,
                              "precision": "fp32"})
    r = load_recipe(rec, [f"deepspeed={RECIPES / 'deepspeed' / 'zero3.json'}"])
    cfg = build_ds_config(r, world_size=2, hidden_size=64, cuda=False)
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 24 and cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"] == {"enabled": False}
    z = cfg["zero_optimization"]
    assert z["stage"] == 3 and z["stage3_param_persistence_threshold"] == 640 and z["reduce_bucket_size"] == 4096
    assert cfg["optimizer"]["params"] == {"lr": 2e-3, "weight_decay": 0.0, "betas": [0.9, 0.95], "eps": 1e-8,
                                          "torch_adam": True}
    assert "auto" not in json.dumps(cfg)
    assert build_ds_config(load_recipe(rec), 1, 64, cuda=False)["zero_optimization"] == {"stage": 2}  # default config

    def ds(content: dict) -> str:
        f = tmp_path / "ds.json"
        f.write_text(json.dumps(content))
        return error_of(build_ds_config, load_recipe(rec, [f"deepspeed={f}"]), 2, 64, False)

    assert "key train_micro_batch_size_per_gpu: 8 conflicts with train.micro_batch_size = 4" in ds({"train_micro_batch_size_per_gpu": 8})
    assert "key train_batch_size: 16 conflicts" in ds({"train_batch_size": 16})
    assert "key bf16.enabled: true conflicts with train.precision (resolved to fp32)" in ds({"bf16": {"enabled": True}})
    assert "key scheduler: remove it" in ds({"scheduler": {"type": "WarmupLR"}})
    assert "key optimizer.params.lr: 0.1 conflicts with train.lr" in ds({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}})
    assert "key zero_optimization.offload_param.device: \"auto\" is not supported" in ds(
        {"zero_optimization": {"stage": 3, "offload_param": {"device": "auto"}}})


def test_lr_schedule():
    class T:
        warmup_steps, max_steps, min_lr_ratio, lr_schedule = 10, 110, 0.1, "cosine"

    assert lr_factor(0, T) == pytest.approx(0.1) and lr_factor(9, T) == pytest.approx(1.0)
    assert lr_factor(10, T) == pytest.approx(1.0) and lr_factor(60, T) == pytest.approx(0.55)
    assert lr_factor(110, T) == pytest.approx(0.1)
    T.lr_schedule = "constant"
    assert lr_factor(50, T) == 1.0


# ------------------------------------------------------------------- the CLI fails fast, in one line
def run_cli(args: list[str]):
    result = CliRunner().invoke(app, ["adapt", *args])
    lines = [x for x in result.output.splitlines() if x.strip() and not x.startswith(("tokenising", "data:"))]
    return result.exit_code, lines


def test_cli_bad_recipes_fail_fast_with_the_key(tmp_path, text_file, card_tiny, tiny_ckpt):
    rec = write_recipe(tmp_path / "r.yaml", model=str(card_tiny), output_dir=str(tmp_path / "run"),
                       data={"path": str(text_file), "cache_dir": str(tmp_path / "cache"), "validation_fraction": 0.1},
                       train={"seq_len": 32, "precision": "fp32"})
    cases = [
        (["--set", "data.pth=x"], "unknown recipe key data.pth (did you mean data.path?)"),
        (["--set", "train.seq_len=abc"], "recipe key train.seq_len: expected an integer, got 'abc'"),
        (["--set", f"data.path={tmp_path / 'nope.txt'}"], "recipe key data.path: no such file or directory"),
        (["--set", "train.seq_len=1024"], "recipe key train.seq_len: 1024 exceeds the model's maximum of 256 positions"),
        (["--set", f"model={tiny_ckpt('llama')}"], "is not a CARD checkpoint"),
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n\n")
    cases.append((["--set", f"data.path={empty}"], "recipe key data.path:"))
    short = tmp_path / "short.txt"
    short.write_text("Tom ran.\n\nLily sat.")
    cases.append((["--set", f"data.path={short}", "--set", "data.validation_fraction=0"],
                  "recipe key train.seq_len: the training split has"))
    cases.append((["--set", "train.seq_len=200"], "recipe key data.validation_fraction: the validation split is empty"))
    for args, expected in cases:
        t0 = time.perf_counter()
        code, lines = run_cli([str(rec), *args])
        assert code == 2, (args, lines)
        assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], (args, lines)
        assert time.perf_counter() - t0 < 20
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained, nothing written
