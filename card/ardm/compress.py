"""Lossless compression with a CARD model: ARDM's coding scheme with a range coder (``constriction``).

Tokens. Input that is UTF-8 and round-trips through the tokenizer (``decode(encode(text)) == text``) is
coded as the tokenizer's tokens over the decoder's vocabulary (the mask token and padding rows excluded);
anything else (binary, invalid UTF-8, text the tokenizer normalises) as one byte token per byte (the
tokenizer's ``<0xAB>`` pieces or byte-level alphabet) over those 256 tokens; a tokenizer with neither is a
one-line refusal.

Windows. The tokens are cut into ceil(n / window) windows of balanced lengths (L or L - 1 tokens, L <=
``window``); each window starts from the context [BOS] alone (a deterministic reset), so windows are
independent. Up to ``batch`` windows run side by side as one batch of L positions; a window one token short
has a padding position at its end that is neither coded nor read by any later position. Batching is what
makes a large model usable: a forward of 40 windows costs a few times one window's on a CPU, while exact
decoding needs one forward per position.

Plan. For each window of T tokens the plan is a list of group sizes: exact mode is T groups of 1; ``budget``
F < 1 plans ceil(F * T) groups with ARDM's DP over the checkpoint's ``slot_profile`` (card.ardm.plan). A
group of g tokens is one forward over [the previous group's tokens] + [M] * (g - 1) with the KV cache of
everything before: slot 1 (the last real token's logits, exact AR) codes the group's first token, mask j's
logits code token j + 1. Each token is coded with its own slot's marginal, so a group costs about
C_s(g) = sum_j l_j(s) bits.

Bit-identical probabilities. The decoder must see the very floats the encoder coded with. Both sides run
the same function (``_replay``) with the same model calls in the same order and shapes (fp32, same batch
of windows, same group sizes, same cache operations, same number of CPU threads, which the header
records: one by default, because a shared CPU makes multi-threaded small forwards erratic); the encoder merely knows each group's tokens
before the call, the decoder decodes them after it. Probabilities are the float64 softmax of the fp32
logits over the alphabet, computed by the same torch code on both sides; ``constriction``'s
``Categorical(perfect=False)`` quantises them deterministically. The header's weights and tokenizer hashes
refuse another model, and a sha256 of the original bytes is checked before anything is written. The same
file decompresses on the same kind of machine and torch build; elsewhere the checksum says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from card.ardm import container
from card.ardm.plan import plan_groups
from card.errors import CardError
from card.io import atomic_write_bytes

DEFAULT_BATCH = 64
DEFAULT_WINDOW_CAP = 1024
DEFAULT_THREADS = 1
OnForward = Callable[[int, int], None]  # after each model call: (tokens it coded, tokens in the whole input)


@dataclass
class Stats:
    input_bytes: int
    output_bytes: int
    tokens: int
    forwards: int  # sequential forwards summed over windows (= tokens in exact mode)
    calls: int  # model calls (one serves a batch of windows)
    seconds: float
    mode: str
    budget: float
    windows: int
    settings: dict = field(default_factory=dict)

    @property
    def bits_per_byte(self) -> float:
        return 8 * self.output_bytes / self.input_bytes if self.input_bytes else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0

    def summary(self, verb: str = "compressed") -> str:
        sizes = (self.output_bytes, self.input_bytes) if verb == "decompressed" else (self.input_bytes, self.output_bytes)
        return (f"{verb} {sizes[0]:,} -> {sizes[1]:,} bytes ({self.bits_per_byte:.3f} bits/byte), "
                f"{self.tokens:,} {self.mode} tokens in {self.forwards:,} forwards "
                f"({self.tokens_per_forward:.2f} tokens/forward, {self.calls:,} batched calls), {self.seconds:.2f} s")


# ----------------------------------------------------------------------------------------- tokens
def byte_token_ids(tokenizer) -> np.ndarray | None:
    """Ids of 256 single-byte tokens in byte order: SentencePiece byte-fallback pieces ``<0xAB>``, or the
    byte-level BPE alphabet (GPT-2's byte-to-unicode map); None when the tokenizer has neither."""
    vocab = tokenizer.get_vocab()
    pieces = [f"<0x{b:02X}>" for b in range(256)]
    if all(p in vocab for p in pieces):
        return np.array([vocab[p] for p in pieces], np.int64)
    chars = byte_level_chars()
    if all(chars[b] in vocab for b in range(256)):
        return np.array([vocab[chars[b]] for b in range(256)], np.int64)
    return None


def byte_level_chars() -> dict[int, str]:
    """GPT-2's byte-level BPE map from byte to printable character: printable Latin-1 bytes map to
    themselves, the other 68 to chr(256 + n) in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    out, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b], n = chr(256 + n), n + 1
    return out


def tokenizer_hash(tokenizer) -> bytes:
    """16 bytes of a sha256 over what decides the tokens: class, vocabulary, special tokens, pipeline."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(sorted(map(str, tokenizer.all_special_tokens))).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    return h.digest()[:16]


@dataclass
class Codec:
    """A loaded CARD checkpoint ready to compress and decompress (fp32)."""

    model: object
    tokenizer: object
    meta: object
    weights: bytes
    tok_hash: bytes
    vocab_ids: np.ndarray  # text-mode alphabet: token ids the decoder may emit, ascending
    byte_ids: np.ndarray | None
    start_id: int
    max_positions: int | None

    @classmethod
    def load(cls, ckpt: str | os.PathLike) -> "Codec":
        from card.checkpoint import load_checkpoint
        from card.io import state_dict_sha256
        from card.profile import max_positions

        ck = load_checkpoint(ckpt, dtype="float32", require_card=True)
        start = ck.tokenizer.bos_token_id if ck.tokenizer.bos_token_id is not None else ck.tokenizer.eos_token_id
        if start is None:
            raise CardError(f"{ckpt}: the tokenizer has neither a BOS nor an EOS token to start windows with")
        banned = set(ck.meta.suppressed_token_ids)
        vocab_ids = np.array([i for i in range(ck.meta.vocab_size) if i not in banned], np.int64)
        weights = bytes.fromhex(state_dict_sha256(ck.model.state_dict()))[:16]
        return cls(ck.model, ck.tokenizer, ck.meta, weights, tokenizer_hash(ck.tokenizer), vocab_ids,
                   byte_token_ids(ck.tokenizer), start, max_positions(ck.model.config))

    # ------------------------------------------------------------------------------------ tokens
    def to_symbols(self, data: bytes) -> tuple[str, np.ndarray]:
        """(mode, symbols): alphabet indices of the input's tokens (module docstring)."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None:
            ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            if self._detokenize(ids) == text:
                sym = np.searchsorted(self.vocab_ids, ids)
                if len(ids) == 0 or (np.all(sym < len(self.vocab_ids)) and np.array_equal(self.vocab_ids[sym], ids)):
                    return "text", sym.astype(np.int64)
        if self.byte_ids is None:
            raise CardError("the input does not round-trip through this tokenizer and the tokenizer has no byte "
                            "tokens to fall back on")
        return "bytes", np.frombuffer(data, np.uint8).astype(np.int64)

    def from_symbols(self, mode: str, symbols: np.ndarray) -> bytes:
        if mode == "bytes":
            return symbols.astype(np.uint8).tobytes()
        return self._detokenize(self.vocab_ids[symbols].tolist()).encode("utf-8")

    def _detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def alphabet(self, mode: str) -> np.ndarray:
        return self.byte_ids if mode == "bytes" else self.vocab_ids

    # ------------------------------------------------------------------------------------ settings
    def default_window(self, slots: int) -> int:
        limit = self.max_positions or DEFAULT_WINDOW_CAP + 16
        return max(1, min(DEFAULT_WINDOW_CAP, limit - 16))

    def check_window(self, window: int, slots: int) -> None:
        # positions used: BOS at 0, tokens 1..window, and at most slots-1 masks after the last committed one
        if window < 1:
            raise CardError(f"window must be at least 1 token, got {window}")
        if self.max_positions and window + slots > self.max_positions:
            raise CardError(f"window {window} + {slots} slots exceeds the model's {self.max_positions} positions")

    def profile_for(self, budget: float) -> tuple[dict | None, bytes, int]:
        if budget >= 1:
            return None, bytes(8), 1
        from card.profile import check_profile

        profile = self.meta.slot_profile
        if profile is None:
            raise CardError("--budget needs the checkpoint's slot profile; measure it first with "
                            "card profile CKPT --data FILE --write")
        check_profile(profile)
        digest = hashlib.sha256(json.dumps(profile, sort_keys=True).encode()).digest()[:8]
        return profile, digest, int(profile["slots"])

    # ------------------------------------------------------------------------------------ coding
    def compress(self, data: bytes, budget: float = 1.0, window: int | None = None, batch: int = DEFAULT_BATCH,
                 on_forward: OnForward | None = None, threads: int = DEFAULT_THREADS) -> tuple[bytes, Stats]:
        import constriction

        t0 = time.perf_counter()
        budget = float(np.float32(budget))  # what the header stores is what both sides plan with
        if not 0 < budget <= 1:
            raise CardError(f"budget must be in (0, 1] forwards per token, got {budget}")
        if batch < 1:
            raise CardError(f"batch must be at least 1 window, got {batch}")
        profile, profile_hash, slots = self.profile_for(budget)
        window = window or self.default_window(slots)
        self.check_window(window, slots)
        mode, symbols = self.to_symbols(data)
        if not 1 <= threads <= 255:
            raise CardError(f"threads must be in 1..255, got {threads}")
        encoder = constriction.stream.queue.RangeEncoder()
        family = constriction.stream.model.Categorical(perfect=False)

        def code(probs: np.ndarray, known: np.ndarray, valid: np.ndarray) -> np.ndarray:
            if valid.any():
                encoder.encode(known[valid].astype(np.int32), family, probs[valid])
            return known

        with _threads(threads):
            forwards, calls = self._run(mode, len(symbols), window, batch, profile, budget, code, on_forward, symbols)
        payload = encoder.get_compressed().astype("<u4").tobytes()
        header = container.Header(self.weights, self.tok_hash, mode, budget, window, batch, slots, threads, profile_hash,
                                  len(data), len(symbols), hashlib.sha256(data).digest()[:16])
        blob = container.pack(header, payload)
        stats = Stats(len(data), len(blob), len(symbols), forwards, calls, time.perf_counter() - t0, mode, budget,
                      -(-len(symbols) // window), {"window": window, "batch": batch, "slots": slots, "threads": threads})
        return blob, stats

    def decompress(self, blob: bytes, on_forward: OnForward | None = None, name: str = "input") -> tuple[bytes, Stats]:
        import constriction

        t0 = time.perf_counter()
        h, payload = container.unpack(blob, name)
        if h.weights != self.weights:
            raise CardError(f"{name} was compressed with another model (weights {h.weights.hex()[:12]}, "
                            f"this checkpoint's are {self.weights.hex()[:12]})")
        if h.tokenizer != self.tok_hash:
            raise CardError(f"{name} was compressed with another tokenizer ({h.tokenizer.hex()[:12]}, this "
                            f"checkpoint's is {self.tok_hash.hex()[:12]})")
        profile, profile_hash, slots = self.profile_for(h.budget)
        if h.budget < 1 and (profile_hash != h.profile or slots != h.slots):
            raise CardError(f"{name} was planned with another slot profile ({h.profile.hex()}) than this checkpoint's "
                            f"({profile_hash.hex()}); decompress with the checkpoint as it was when compressing")
        if h.mode == "bytes" and self.byte_ids is None:
            raise CardError(f"{name} holds byte tokens but this tokenizer has none")
        self.check_window(h.window, h.slots)
        words = np.frombuffer(payload, "<u4").astype(np.uint32)
        decoder = constriction.stream.queue.RangeDecoder(words)
        family = constriction.stream.model.Categorical(perfect=False)

        def code(probs: np.ndarray, _known, valid: np.ndarray) -> np.ndarray:
            got = np.zeros(valid.shape, np.int64)
            if valid.any():
                try:
                    got[valid] = np.asarray(decoder.decode(family, probs[valid]), np.int64)
                except (AssertionError, ValueError, RuntimeError):
                    raise CardError(f"{name}: decoding failed: the model's probabilities differ from the "
                                    f"compressor's (another machine or torch build) or the file is corrupted") from None
            return got

        out = np.zeros(h.tokens, np.int64)
        with _threads(h.threads):
            forwards, calls = self._run(h.mode, h.tokens, h.window, h.batch, profile, h.budget, code, on_forward,
                                        None, out)
        try:
            data = self.from_symbols(h.mode, out)
        except (UnicodeDecodeError, IndexError):
            data = None
        if data is None or len(data) != h.length or hashlib.sha256(data).digest()[:16] != h.checksum:
            raise CardError(f"{name}: the decompressed data fails its checksum (corrupted, or compressed on a "
                            f"machine whose floating point differs from this one)")
        return data, Stats(len(data), len(blob), h.tokens, forwards, calls, time.perf_counter() - t0, h.mode,
                           h.budget, -(-h.tokens // h.window) if h.tokens else 0,
                           {"window": h.window, "batch": h.batch, "slots": h.slots, "threads": h.threads})

    # ------------------------------------------------------------------------------------ the schedule
    def _run(self, mode, n, window, batch, profile, budget, code, on_forward, known=None, out=None) -> tuple[int, int]:
        """Both sides' schedule: windows in order, equal-length windows batched; returns (forwards, calls)."""
        alphabet = torch.as_tensor(self.alphabet(mode))
        forwards = calls = 0
        for starts, lengths in batches(n, window, batch):
            T = max(lengths)
            groups = [1] * T if profile is None else plan_groups(profile, T, budget)
            valid = np.arange(T)[None, :] < np.asarray(lengths)[:, None]  # (B, T): False = a padding position
            sym_idx = np.where(valid, np.asarray(starts)[:, None] + np.arange(T)[None, :], 0)
            known_b = None if known is None else np.where(valid, known[sym_idx], 0)
            tick = None if on_forward is None else (lambda k: on_forward(k, n))  # noqa: E731
            got = _replay(self.model, self.start_id, self.meta.mask_token_id, alphabet, valid, groups,
                          code, known_b, tick)
            if out is not None:
                out[sym_idx[valid]] = got[valid]
            forwards += len(groups) * len(starts)
            calls += len(groups)
        return forwards, calls


def batches(n: int, window: int, batch: int) -> list[tuple[list[int], list[int]]]:
    """n tokens in k = ceil(n / window) consecutive windows of balanced lengths (the first n mod k windows
    one token longer than the rest, all at most ``window``), grouped as (starts, lengths), at most ``batch``
    windows a group."""
    if n == 0:
        return []
    k = -(-n // window)
    base, extra = divmod(n, k)
    lengths = [base + 1] * extra + [base] * (k - extra)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int).tolist()
    return [(starts[i:i + batch], lengths[i:i + batch]) for i in range(0, k, batch)]


@contextlib.contextmanager
def _threads(n: int):
    """Run the forwards on ``n`` CPU threads: matrix kernels split their sums by thread, so the float results
    (and with them the coded probabilities) depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _softmax64(logits: torch.Tensor) -> np.ndarray:
    """p = exp(x - max x) / sum exp(x - max x) in float64 (from fp32 logits), by torch's kernel on the
    current thread count: the same on both sides (1.5x faster than numpy's over a 49k vocabulary)."""
    return torch.softmax(logits.double(), dim=-1).numpy()


@torch.no_grad()
def _replay(model, start_id: int, mask_id: int, alphabet: torch.Tensor, valid: np.ndarray, groups: Sequence[int],
            code: Callable[[np.ndarray, np.ndarray | None, np.ndarray], np.ndarray], known: np.ndarray | None,
            on_forward: Callable[[int], None] | None) -> np.ndarray:
    """Run the plan on B windows side by side (``valid`` (B, T) marks each window's real positions);
    ``code(probs (B, g, A), known (B, g) or None, valid (B, g))`` codes one group's real positions and
    returns its symbols. The call sequence depends only on (valid.shape, groups), never on the data."""
    import transformers as tf

    B = valid.shape[0]
    T = sum(groups)
    symbols = np.zeros((B, T), np.int64)
    cache = tf.DynamicCache(config=model.config)
    pending = torch.full((B, 1), start_id, dtype=torch.long)
    pos, done = 0, 0
    for g in groups:
        inp = torch.cat([pending, torch.full((B, g - 1), mask_id, dtype=torch.long)], dim=1)
        P = pending.shape[1]
        position_ids = torch.arange(pos, pos + inp.shape[1]).expand(B, -1)
        logits = model(input_ids=inp, position_ids=position_ids, past_key_values=cache, use_cache=True).logits
        probs = _softmax64(logits[:, P - 1:P - 1 + g].float()[..., alphabet])
        v = valid[:, done:done + g]
        got = code(probs, None if known is None else known[:, done:done + g], v)
        symbols[:, done:done + g] = got
        if on_forward:
            on_forward(int(v.sum()))
        if g > 1:
            cache.crop(-(g - 1))  # keep the real tokens' entries, drop the masks'
        pos += P
        done += g
        pending = alphabet[torch.as_tensor(got)]
    return symbols


# ------------------------------------------------------------------------------------------- files
def _read(path: str | os.PathLike, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise CardError(f"cannot read {what} {path}: {e.strerror or e}") from None


def compress_file(ckpt, src, dst, *, budget: float = 1.0, window: int | None = None, batch: int = DEFAULT_BATCH,
                  overwrite: bool = False, on_forward: OnForward | None = None, codec: Codec | None = None) -> Stats:
    """``card compress``: SRC -> DST (written atomically, only once everything succeeded)."""
    from card.io import check_file_destination

    check_file_destination(dst, overwrite, inputs=[src])
    data = _read(src, "input")
    codec = codec or Codec.load(ckpt)
    blob, stats = codec.compress(data, budget=budget, window=window, batch=batch, on_forward=on_forward)
    atomic_write_bytes(dst, blob)
    return stats


def decompress_file(ckpt, src, dst, *, overwrite: bool = False, on_forward: OnForward | None = None,
                    codec: Codec | None = None) -> Stats:
    """``card decompress``: SRC -> DST; any mismatch or corruption is one line and DST is not written."""
    from card.io import check_file_destination

    check_file_destination(dst, overwrite, inputs=[src])
    blob = _read(src, "input")
    container.unpack(blob, str(src))  # fail on a damaged file before loading any weights
    codec = codec or Codec.load(ckpt)
    data, stats = codec.decompress(blob, on_forward=on_forward, name=str(src))
    atomic_write_bytes(dst, data)
    return stats


__all__ = ["Codec", "Stats", "batches", "byte_token_ids", "compress_file", "decompress_file"]
