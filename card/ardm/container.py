"""The ``card compress`` file format: a fixed header, then the range coder's words.

    offset  size  field
    0       5     magic b"CARDZ"
    5       1     format version (2: balanced, batched windows)
    6       16    weights hash (first 16 bytes of the sha256 of the state dict, ``card.io.state_dict_sha256``)
    22      16    tokenizer hash (first 16 bytes of a sha256 over the tokenizer's vocabulary and pipeline)
    38      1     token mode: 0 text (the tokenizer's own tokens), 1 bytes (one byte token per byte)
    39      4     budget: forwards per token, float32 (1.0 = exact AR)
    43      4     window: data tokens per window (each window restarts from a BOS-only context)
    47      4     batch: windows run side by side in one forward
    51      1     slots used by the plan (K+1; 1 in exact mode)
    52      1     CPU threads of the forwards (float results depend on it; the decoder uses the same)
    53      8     profile hash (first 8 bytes of the sha256 of the slot profile that planned; zeros if exact)
    61      8     original length in bytes
    69      8     token count
    77      16    checksum: first 16 bytes of the sha256 of the original bytes
    93      8     payload length in bytes
    101     4     crc32 of the payload
    105     4     crc32 of bytes 0..104
    109     ...   payload: the coder's 32-bit words, little-endian

Everything is little-endian. A wrong magic, an unknown version, a short file or a failed CRC is a one-line
``CardError`` before any decoding starts.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import astuple, dataclass

from card.errors import CardError

MAGIC = b"CARDZ"
VERSION = 2
MODES = ("text", "bytes")
_FMT = "<5sB16s16sBfIIBB8sQQ16sQI"
_HEAD = struct.calcsize(_FMT)  # 105
HEADER_SIZE = _HEAD + 4


@dataclass(frozen=True)
class Header:
    weights: bytes
    tokenizer: bytes
    mode: str
    budget: float
    window: int
    batch: int
    slots: int
    threads: int
    profile: bytes
    length: int
    tokens: int
    checksum: bytes


def pack(h: Header, payload: bytes) -> bytes:
    fields = astuple(h)
    head = struct.pack(_FMT, MAGIC, VERSION, fields[0], fields[1], MODES.index(h.mode), *fields[3:],
                       len(payload), zlib.crc32(payload))
    return head + struct.pack("<I", zlib.crc32(head)) + payload


def unpack(blob: bytes, name: str = "input") -> tuple[Header, bytes]:
    if len(blob) < len(MAGIC) or blob[:len(MAGIC)] != MAGIC:
        raise CardError(f"{name} is not a card compress file (bad magic)")
    if len(blob) < HEADER_SIZE:
        raise CardError(f"{name} is truncated: {len(blob)} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, version, weights, tok, mode, *rest = struct.unpack(_FMT, blob[:_HEAD])
    (crc_head,) = struct.unpack("<I", blob[_HEAD:HEADER_SIZE])
    if version != VERSION:
        raise CardError(f"{name} has format version {version}; this toolkit reads version {VERSION}")
    if zlib.crc32(blob[:_HEAD]) != crc_head:
        raise CardError(f"{name} is corrupted: its header fails its CRC")
    *fields, size, crc = rest
    payload = blob[HEADER_SIZE:]
    if len(payload) < size:
        raise CardError(f"{name} is truncated: payload {len(payload)} of {size} bytes")
    if len(payload) > size:
        raise CardError(f"{name} is corrupted: {len(payload) - size} bytes after the payload")
    if zlib.crc32(payload) != crc:
        raise CardError(f"{name} is corrupted: its payload fails its CRC")
    if mode >= len(MODES):
        raise CardError(f"{name} is corrupted: unknown token mode {mode}")
    return Header(weights, tok, MODES[mode], *fields), payload
