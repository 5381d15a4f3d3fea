"""Hugging Face tokenizer files (vocab.json, merges.txt, tokenizer.json, configs) built from open_clip's own BPE.

open_clip ships the CLIP BPE as ``bpe_simple_vocab_16e6.txt.gz``; ``SimpleTokenizer`` derives its 49408-entry vocab
from it (256 bytes, 256 bytes + ``</w>``, 48894 merges, start/end of text). Writing the same vocab and merges in
the layout ``CLIPTokenizer`` reads gives token ids identical to open_clip's, so an HF or ONNX deployment needs no
clipslim. Differences that remain: open_clip pads with id 0 and runs ftfy + HTML unescaping before lowercasing, the
HF tokenizer pads with ``<|endoftext|>`` and does not unescape; with the causal mask and end-of-text pooling the
padding does not change any embedding (checked by ``compare_ids``).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import torch

from clipslim.io import atomic_write_json, atomic_write_text

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
N_MERGES = 49152 - 256 - 2  # SimpleTokenizer keeps lines 1 .. 48894 of the BPE file
VOCAB_SIZE = 49408
SPECIAL_TOKENS = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def clip_bpe() -> tuple[dict[str, int], list[str]]:
    """open_clip's vocab (token -> id, HF special-token spelling) and merges ("a b" lines), from the wheel's file."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : N_MERGES + 1]
    byte_chars = list(bytes_to_unicode().values())
    tokens = [*byte_chars, *(c + "</w>" for c in byte_chars), *("".join(m.split()) for m in merges), BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def check_open_clip_tokenizer(tokenizer: Any) -> str | None:
    """Why ``tokenizer`` cannot be written as CLIP BPE files; None when it can (a lower-casing SimpleTokenizer)."""
    from open_clip.tokenizer import SimpleTokenizer, _clean_lower

    if not isinstance(tokenizer, SimpleTokenizer):
        return f"tokenizer {type(tokenizer).__name__} (only open_clip's SimpleTokenizer has CLIP BPE files)"
    if tokenizer.clean_fn is not _clean_lower or tokenizer.reduction_fn is not None:
        return "tokenizer text cleaning other than 'lower' (tokenizer_kwargs) has no CLIPTokenizer equivalent"
    if len(tokenizer.encoder) != VOCAB_SIZE:
        return f"tokenizer with {len(tokenizer.encoder)} tokens (additional special tokens; CLIP has {VOCAB_SIZE})"
    return None


def write_tokenizer(out_dir: str | Path, context_length: int) -> list[Path]:
    """Write the CLIPTokenizer files for ``context_length`` into ``out_dir``; returns their paths."""
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe()
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=context_length)
    tok.save_pretrained(str(out_dir))  # tokenizer.json, tokenizer_config.json
    # transformers 5 writes only tokenizer.json; other runtimes and older transformers read these three
    atomic_write_text(out_dir / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(out_dir / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    atomic_write_json(out_dir / "special_tokens_map.json", SPECIAL_TOKENS)
    missing = [name for name in FILES if not (out_dir / name).is_file()]
    if missing:
        raise RuntimeError(f"transformers did not write {missing} to {out_dir}")
    return [out_dir / name for name in FILES]


def hf_token_ids(folder: str | Path, captions: list[str], context_length: int) -> torch.Tensor:
    """Token ids of ``captions`` from the CLIPTokenizer saved in ``folder``, padded to ``context_length``."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(folder))
    enc = tok(captions, padding="max_length", truncation=True, max_length=context_length, return_tensors="pt")
    return enc["input_ids"]


def compare_ids(open_clip_ids: torch.Tensor, hf_ids: torch.Tensor, eot_id: int = VOCAB_SIZE - 1) -> int:
    """How many rows agree up to and including the first end-of-text token (padding may differ, see module doc)."""
    agree = 0
    for a, b in zip(open_clip_ids.tolist(), hf_ids.tolist(), strict=True):
        end = a.index(eot_id) + 1 if eot_id in a else len(a)
        agree += a[:end] == b[:end]
    return agree
