"""SmolLM2-135M-Instruct, a real instruct model no one here trained, through every stage, as users have it:
a GGUF file (Q4_1) with a 49k vocabulary, tied embeddings and a ChatML chat template.

* convert: the GGUF conversion's logits equal transformers' own dequantised model, plain ``transformers``
  loads the result, and a second conversion (through ``--gguf-file``) is byte-identical;
* decode: our AR decoding equals ``generate`` greedy token for token and lossless equals AR, on a plain and
  on a chat prompt; ``card generate --chat`` answers the capital of France with Paris in ar and lossless;
* lm-eval: the ``card`` model equals lm-eval's ``hf`` backend on PIQA and HellaSwag docs, also with the chat
  template, and ``card eval --apply-chat-template`` passes it through;
* adapt: chat-formatted GSM8K (``data.messages_field``) masks only the assistant turns, and a 2-step
  ``card adapt`` on 2 ranks writes a loadable ``final/``.

The model file comes from ``make models`` (``card fetch-model smollm2-135m-instruct``). Without it these
tests fail, never skip. One converted checkpoint is shared by the whole session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
import torch
import transformers as tf
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from card.checkpoint import load_checkpoint
from card.chat import chat_prompt_ids, end_of_turn_ids, render_with_spans
from card.convert import convert
from card.errors import CardError
from card.eval.decoding import decode_ar, decode_lossless
from card.eval.lm_model import CardLM
from card.eval.runner import BUNDLED_TASKS, evaluate
from card.metadata import read_metadata
from card.models import model_info, model_path

pytestmark = pytest.mark.real_model

NAME = "smollm2-135m-instruct"
REPO = Path(__file__).resolve().parents[1]
CARD = Path(sys.executable).parent / "card"
QUESTION = "What is the capital of France?"
PLAIN_PROMPT = "The three primary colors are"
NEW_TOKENS = 16
LIMIT = 4


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    try:
        return model_path(NAME, check=True)
    except CardError as e:
        pytest.fail(f"{e}. The real-model tests never skip: run `make models` first.", pytrace=False)


@pytest.fixture(scope="session")
def smol_card(smollm2_gguf, tmp_path_factory):
    """The GGUF file converted once for the whole session: (path, ConvertReport). Read-only for tests."""
    dst = tmp_path_factory.mktemp("smollm2") / "smollm2-card"
    return dst, convert(str(smollm2_gguf), dst)


@pytest.fixture(scope="session")
def smol(smol_card):
    return load_checkpoint(smol_card[0], dtype="float32", require_card=True)


# ------------------------------------------------------------------------------------------ convert
def test_gguf_conversion_equals_the_dequantised_model(smollm2_gguf, smol_card, smol, two_threads):
    dst, report = smol_card
    assert report.verified and report.max_abs_diff == 0.0 and report.argmax_equal
    assert (report.source_format, report.quantization, report.dtype) == ("gguf", "Q4_1", "float32")
    meta = read_metadata(json.loads((dst / "config.json").read_text()))
    assert meta.source["format"] == "gguf" and meta.source["quantization"] == "Q4_1"
    assert meta.source["file_sha256"] == model_info(NAME).sha256
    assert meta.source["tensor_types"]["Q4_1"] > 0
    assert "quantization_config" not in json.loads((dst / "config.json").read_text())

    # The reference: transformers' own GGUF loader, independent of the converter.
    ref = tf.AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                  dtype=torch.float32).eval()
    ref_tok = tf.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    plain = tf.AutoModelForCausalLM.from_pretrained(dst).eval()  # plain transformers, no CARD code
    assert isinstance(plain, tf.LlamaForCausalLM) and plain.config.tie_word_embeddings
    assert plain.config.num_hidden_layers == 30 and meta.original_vocab_size == 49152
    assert smol.tokenizer.chat_template == ref_tok.chat_template and "<|im_start|>" in smol.tokenizer.chat_template
    for ids in (ref_tok(PLAIN_PROMPT)["input_ids"], chat_prompt_ids(ref_tok, QUESTION)):
        assert smol.tokenizer(ref_tok.decode(ids))["input_ids"] == ids  # same tokenizer
        x = torch.tensor([ids])
        with torch.no_grad():
            want, got = ref(input_ids=x).logits[0], plain(input_ids=x).logits[0, :, :49152]
        assert (got - want).abs().max().item() <= 1e-4
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_second_conversion_through_gguf_file_is_byte_identical(smollm2_gguf, smol_card, tmp_path):
    dst, _ = smol_card
    again = tmp_path / "again"
    convert(str(smollm2_gguf.parent), again, gguf_file=smollm2_gguf.name, verify=False)
    files = sorted(p.name for p in dst.iterdir())
    assert files == sorted(p.name for p in again.iterdir()) and "model.safetensors" in files
    for name in files:
        assert (dst / name).read_bytes() == (again / name).read_bytes(), name


# ------------------------------------------------------------------------------------------ decode
def hf_greedy(model, ids, n, eos):
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                         past_key_values=tf.DynamicCache(config=model.config))
    return out[0, x.shape[1]:].tolist()


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_ar_equals_generate_and_lossless_equals_ar(smol, chat, two_threads):
    tok = smol.tokenizer
    ids = chat_prompt_ids(tok, QUESTION) if chat else tok(PLAIN_PROMPT)["input_ids"]
    eos = end_of_turn_ids(tok) if chat else [tok.eos_token_id]
    ar = decode_ar(smol.model, tok, [ids], max_new_tokens=NEW_TOKENS, eos_token_ids=eos)[0]
    assert ar.token_ids == hf_greedy(smol.model, ids, NEW_TOKENS, eos)
    lossless = decode_lossless(smol.model, tok, [ids], max_new_tokens=NEW_TOKENS, eos_token_ids=eos,
                               mask_id=smol.meta.mask_token_id)[0]
    assert lossless.token_ids == ar.token_ids and lossless.forwards <= ar.forwards
    if chat:
        assert "Paris" in ar.text and ar.finish_reason == "eos"


def test_end_of_turn_comes_from_the_template(smol):
    tok = smol.tokenizer
    assert tok.convert_ids_to_tokens(end_of_turn_ids(tok))[0] == "<|im_end|>"
    ids = chat_prompt_ids(tok, QUESTION, system="Answer in one word.")
    text = tok.decode(ids)
    assert text.endswith("<|im_start|>assistant\n") and "Answer in one word." in text and QUESTION in text


def test_card_generate_chat_answers_paris_in_ar_and_lossless(smol_card):
    outs = {}
    for mode in ("ar", "lossless"):
        p = subprocess.run([str(CARD), "generate", str(smol_card[0]), QUESTION, "--chat", "--decoding", mode,
                            "--max-new-tokens", "24", "--json"], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        outs[mode] = json.loads(p.stdout.strip().splitlines()[-1])
    assert "Paris" in outs["ar"]["text"] and outs["ar"]["finish_reason"] == "eos"
    assert outs["lossless"]["token_ids"] == outs["ar"]["token_ids"]
    assert outs["ar"]["chat"] is True
    p = subprocess.run([str(CARD), "generate", str(smol_card[0]), QUESTION, "--system", "x"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "--system needs --chat" in p.stderr


# ------------------------------------------------------------------------------------------ lm-eval
@pytest.fixture(scope="module")
def tm():
    return TaskManager(include_path=str(BUNDLED_TASKS), include_defaults=False)


def run_tasks(lm, tm, chat: bool):
    return lm_eval.simple_evaluate(model=lm, tasks=["card_piqa", "card_hellaswag"], task_manager=tm, limit=LIMIT,
                                   log_samples=True, bootstrap_iters=0, apply_chat_template=chat)


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_lm_eval_card_model_equals_hf_backend(smol_card, tm, chat, two_threads):
    path = str(smol_card[0])
    hf = run_tasks(HFLM(pretrained=path, dtype="float32", device="cpu", batch_size=8), tm, chat)
    card = run_tasks(CardLM(pretrained=path, dtype="float32", device="cpu", batch_size=8), tm, chat)
    for task in ("card_piqa", "card_hellaswag"):
        ref = {s["doc_id"]: s for s in hf["samples"][task]}
        got = {s["doc_id"]: s for s in card["samples"][task]}
        assert sorted(got) == sorted(ref) == list(range(LIMIT))
        for doc_id, s in got.items():
            assert s["arguments"] == ref[doc_id]["arguments"]
            assert ("<|im_start|>" in s["arguments"][0][0]) == chat  # the chat template reached the prompt
            for (ll, greedy), (ref_ll, ref_greedy) in ((r[0], q[0]) for r, q in zip(s["resps"], ref[doc_id]["resps"])):
                assert abs(float(ll) - float(ref_ll)) <= 1e-4 and bool(greedy) == bool(ref_greedy)
        for metric in ("acc,none", "acc_norm,none"):
            assert card["results"][task][metric] == hf["results"][task][metric]
    if chat:  # card eval passes the flag through to lm-eval: the same scores as the direct run
        res = evaluate(path, "card_piqa", "ar", limit=LIMIT, apply_chat_template=True, bootstrap_iters=0)
        assert res.settings["apply_chat_template"] is True
        assert res.runs[0].scores["card_piqa"]["acc,none"] == card["results"]["card_piqa"]["acc,none"]


def test_card_lm_eval_finds_bundled_tasks_quietly_outside_git(smol_card, tmp_path):
    """As the README shows it: no --include_path, run from a folder that is no git checkout, output piped."""
    p = subprocess.run([str(CARD), "lm-eval", "--model", "card", "--model_args", f"pretrained={smol_card[0]}",
                        "--tasks", "card_piqa", "--limit", "2", "--batch_size", "4"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "card_piqa" in p.stdout and "acc" in p.stdout
    assert "not a git repository" not in p.stderr + p.stdout
    assert "it/s]" not in p.stderr and "%|" not in p.stderr  # no progress bars in a piped log


def test_eval_chat_flags_are_checked(smol_card):
    with pytest.raises(CardError, match="--fewshot-as-multiturn needs --apply-chat-template"):
        evaluate(str(smol_card[0]), "card_piqa", "ar", fewshot_as_multiturn=True)


# ------------------------------------------------------------------------------------------ adapt
def gsm8k_chat(src: Path, dst: Path, n: int) -> Path:
    """The first ``n`` GSM8K training problems as conversations (user question, assistant worked answer)."""
    with open(src) as f:
        rows = [json.loads(line) for _, line in zip(range(n), f)]
    dst.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["question"]},
                                                    {"role": "assistant", "content": r["answer"]}]}) + "\n"
                           for r in rows))
    return dst


def test_chat_rows_mark_exactly_the_assistant_turns(smol, data_dir):
    from card.adapt.data import Document, RowFormat, _chat_rows

    tok = smol.tokenizer
    conv = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
            {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "It is 6."}]
    text, spans = render_with_spans(tok, conv)
    assert [text[a:b] for a, b in spans] == ["4.<|im_end|>\n", "It is 6.<|im_end|>\n"]
    fmt = RowFormat(128, "none", None, tok.pad_token_id, False, False, chat=True)
    stats = dict(documents=0, tokens=0, truncated=0)
    row, valid, comp = next(_chat_rows(tok, [Document("", messages=conv)], fmt, stats))
    assert tok.decode(row[valid]) == text
    assert tok.decode(row[comp]) == "4.<|im_end|>\nIt is 6.<|im_end|>\n"
    short = RowFormat(8, "none", None, tok.pad_token_id, False, False, chat=True)
    row, valid, comp = next(_chat_rows(tok, [Document("", messages=conv)], short, stats))
    assert valid.all() and not comp.any() and stats["truncated"] == 1  # too long: the start is kept


def test_two_rank_adapt_on_chat_data_writes_a_loadable_final(smol_card, data_dir, tmp_path):
    data = gsm8k_chat(data_dir / "eval" / "gsm8k_train.jsonl", tmp_path / "gsm8k_chat.jsonl", 40)
    run = tmp_path / "run"
    env = {**os.environ, "CARD_CACHE_DIR": str(tmp_path / "cache"), "CARD_DATA_DIR": str(data_dir)}
    p = subprocess.run(
        [str(CARD), "adapt", "recipes/stories260k-cpu.yaml", "--set", f"model={smol_card[0]}",
         "--set", f"data.path={data}", "--set", "data.messages_field=messages", "--set", "data.separator=none",
         "--set", "data.validation_fraction=0.1", "--set", "data.max_validation_blocks=2",
         "--set", "objective.mask_scope=completion", "--set", "objective.loss_scope=completion",
         "--set", "train.seq_len=192", "--set", "train.micro_batch_size=1", "--set", "train.max_steps=2",
         "--set", "train.warmup_steps=0", "--set", "train.log_every=1", "--set", "train.eval_every=0",
         "--set", "train.save_every=0", "--set", "train.lr=1e-5", "--nproc-per-node", "2", "--output-dir", str(run)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x.get("split") != "validation"]
    assert [x["step"] for x in train] == [1, 2]
    assert all(0 < x["mask_ratio"] < 1 for x in train)  # masks only on the assistant turns
    model = tf.AutoModelForCausalLM.from_pretrained(run / "final")
    meta = read_metadata(model.config)
    assert meta.adaptation and meta.adaptation[-1]["steps"] == 2
    assert isinstance(model, tf.LlamaForCausalLM) and model.config.tie_word_embeddings
    assert tf.AutoTokenizer.from_pretrained(run / "final").chat_template == load_tok_template(smol_card[0])


def load_tok_template(path) -> str:
    return tf.AutoTokenizer.from_pretrained(path).chat_template


# ------------------------------------------------------------------------------------------ GPU check
def test_gpu_check_dry_run(smol_card, tmp_path):
    """The GPU check's whole path on CPU with tiny step counts, so it cannot rot before a GPU runs it."""
    from benchmarks.gpu_check import main

    out = tmp_path / "gpu_check.json"
    r = main(["--dry-run", "--checkpoint", str(smol_card[0]), "--out", str(out), "--work", str(tmp_path / "w")])
    assert json.loads(out.read_text())["dry_run"] is True
    assert r["adapt"]["steps"] == 2 and Path(r["adapt"]["final"]).is_dir()
    rows = {(x["batch"], x["mode"]): x for x in r["decode"]}
    assert set(rows) == {(b, m) for b in (1, 2) for m in ("ar", "lossless", "parallel@0.9", "parallel@0.7")}
    for b in (1, 2):
        assert rows[b, "lossless"]["agreement_with_ar"] == 1.0
        assert rows[b, "ar"]["tokens_per_forward"] == 1.0
    assert r["piqa"]["acc_equal"] is True
