"""The real CLIP ViT-L/14 BPE tokenizer, built offline from the merges shipped in the package.

Stable Diffusion 1.x and 2.x both use OpenAI CLIP's byte-level BPE (49,408 tokens). Its merges are
public data (see ``trainer/assets/clip_bpe/LICENSE``); the vocabulary is derived from them exactly as
OpenAI's ``simple_tokenizer.py`` does, so token ids match every UI.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from importlib import resources
from pathlib import Path

from transformers import CLIPTokenizer

# OpenAI keeps the first 49152 - 256 - 2 merges: 256 byte tokens, 256 end-of-word byte tokens,
# the merges and two special tokens make 49,408.
_MERGE_COUNT = 49152 - 256 - 2
VOCAB_SIZE = 49408
MODEL_MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character table of GPT-2/CLIP byte-level BPE, in CLIP's order.

    The order matters: the vocabulary lists the printable bytes first, then the remapped ones.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The CLIP vocabulary (token -> id) and merge list, derived from the shipped BPE file."""
    bpe = resources.files("trainer.assets.clip_bpe").joinpath("bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.decompress(bpe.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : _MERGE_COUNT + 1]
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer_files(directory: Path, pad_token: str = "<|endoftext|>") -> None:
    """Write ``vocab.json``, ``merges.txt`` and a tokenizer config that ``CLIPTokenizer`` reads.

    SD1 pads with ``<|endoftext|>``; SD2 (OpenCLIP) pads with ``!``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
        "do_lower_case": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A ready CLIP tokenizer, built without touching the network."""
    with tempfile.TemporaryDirectory(prefix="sdtrain-tok-") as tmp:
        write_tokenizer_files(Path(tmp), pad_token=pad_token)
        return CLIPTokenizer.from_pretrained(tmp, local_files_only=True)
