"""Helpers shared by the benchmarks: the shared data folder, the default model, prompts and result files."""

from __future__ import annotations

import gc
import json
import platform
from contextlib import contextmanager
from pathlib import Path

import torch

from card.paths import shared_data_dir

STORIES_FILE = "tinystories/tinystories_v1_validation_first_stories.txt"


def data_dir() -> Path:
    """``$CARD_DATA_DIR``, or ``../shared/data`` beside the repository."""
    return shared_data_dir()


def converted_stories260k(tmp: str | Path) -> Path:
    """Convert the real stories260K (HF copy in the data folder) into a CARD checkpoint under ``tmp``."""
    from card.convert import convert

    dst = Path(tmp) / "stories260K-card"
    convert(str(data_dir() / "stories260K_hf"), dst)
    return dst


def build_llama(path: str | Path, hidden: int, layers: int, heads: int, ffn: int, tied: bool,
                max_positions: int = 1024) -> Path:
    """A randomly initialised Llama checkpoint with the real Llama-2 32k SentencePiece tokenizer."""
    import shutil
    import tempfile

    import transformers as tf

    src = Path(tempfile.mkdtemp())
    shutil.copy(data_dir() / "llama2_tokenizer" / "tokenizer.model", src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",'
        f' "add_bos_token": true, "add_eos_token": false, "legacy": false, "model_max_length": {max_positions}}}'
    )
    tok = tf.AutoTokenizer.from_pretrained(src)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_positions,
                         tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    path = Path(path)
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    shutil.rmtree(src)
    return path


def story_prompts(n: int, sentences: int = 1, min_chars: int = 20) -> list[str]:
    """The first ``sentences`` sentence(s) of ``n`` distinct TinyStories paragraphs (validation split)."""
    text = (data_dir() / STORIES_FILE).read_text(encoding="utf-8")
    prompts: list[str] = []
    for para in text.split("\n\n"):
        parts = para.strip().replace("\n", " ").split(". ")
        prompt = ". ".join(parts[:sentences]).strip()
        prompt = prompt if prompt.endswith((".", "!", "?", '"')) else prompt + "."
        if len(prompt) >= min_chars and prompt not in prompts:
            prompts.append(prompt)
        if len(prompts) == n:
            return prompts
    raise ValueError(f"only {len(prompts)} prompts found in {STORIES_FILE}")


def stop_strings(values) -> tuple[str, ...]:
    """Stop strings as typed on a command line, escapes read: ``--stop '\\n'`` is a newline."""
    return tuple(v.encode().decode("unicode_escape") for v in values)


@contextmanager
def gc_paused():
    """A garbage collection now and none inside, as timeit does: one timed run's garbage is not collected
    inside the next one's timing."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A GitHub markdown table of ``rows``; ``columns`` are (key, header) pairs, floats shown with 2-3 digits."""

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(out_dir: str | Path, name: str, data: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``name.json`` and ``name.md`` into ``out_dir`` atomically."""
    from card.io import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{name}.json", json.dumps(data, indent=2) + "\n")
    atomic_write_text(out / f"{name}.md", markdown + "\n")
    return out / f"{name}.json", out / f"{name}.md"
