"""Our own CLIP tokenizer for the faces world, built from the caption vocabulary.

The files are the ones :class:`transformers.CLIPTokenizer` reads (``vocab.json``, ``merges.txt``,
``tokenizer_config.json``, ``special_tokens_map.json``), laid out like CLIP's:

* ids ``0..255``: the 256 byte symbols of byte-level BPE, ids ``256..511``: the same symbols ending a word
  (``"a</w>"``), so any text at all tokenizes (an unknown word falls back to pieces, down to characters);
* then one token per merge, in merge order, including one for every caption word (``"smiling</w>"``);
* last ``<|startoftext|>`` and ``<|endoftext|>`` (bos, and eos = pad = unk, as in Stable Diffusion).

The merges are chosen so that every vocabulary word becomes exactly one token: a caption of ``n`` words
tokenizes to ``n + 2`` ids (bos and eos). ``model_max_length`` is 77, Stable Diffusion's text length, so a
text encoder trained on these ids has the shape of SD 1.5's.

The real SD 1.5 tokenizer is never read or copied: every file here is derived from the world's words.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
MAX_LENGTH = 77
FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")

# CLIP's word pattern: contractions, runs of letters, single digits, runs of other symbols (the same one
# transformers' CLIPTokenizer splits with, special tokens first).
_WORD_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins of byte-level BPE, indexed by byte value.

    Bytes that are printable and not whitespace (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for
    themselves; the other 68 are given the code points from 256 upwards, in byte order.
    """
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


@functools.cache
def _splitter():
    from tokenizers import Regex, normalizers, pre_tokenizers

    norm = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    split = pre_tokenizers.Split(Regex(_WORD_PATTERN), behavior="removed", invert=True)
    return norm, split


def pieces(text: str) -> list[str]:
    """How the tokenizer splits ``text`` before BPE (NFC, lower case, CLIP's word pattern): its words."""
    norm, split = _splitter()
    return [p for p, _ in split.pre_tokenize_str(norm.normalize_str(text))]


def _symbols(piece: str, table: Sequence[str]) -> list[str]:
    syms = [table[b] for b in piece.encode("utf-8")]
    syms[-1] += END_OF_WORD
    return syms


def _apply(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: merge the best-ranked adjacent pair until none is in ``ranks``."""
    syms = list(symbols)
    while len(syms) > 1:
        best, at = None, -1
        for i in range(len(syms) - 1):
            r = ranks.get((syms[i], syms[i + 1]))
            if r is not None and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        syms[at:at + 2] = [syms[at] + syms[at + 1]]
    return syms


def word_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Merges (in rank order) under which every piece of ``words`` encodes as a single token.

    Each word is encoded with the merges found so far; while it still has several tokens, the pair of its
    first two tokens is appended as the next (lowest-priority) merge. A merge added last can only fire where
    no earlier one does, so words already whole stay whole; a final pass checks all of them.
    """
    table = byte_symbols()
    unique: list[str] = []
    seen = set()
    for w in words:
        for p in pieces(w):
            if p not in seen and p not in (BOS, EOS):
                seen.add(p)
                unique.append(p)
    # Short words first: their merges are the building blocks of longer ones (fewer merges overall).
    unique.sort(key=lambda p: (len(p.encode("utf-8")), p))
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for _ in range(4):
        changed = False
        for p in unique:
            syms = _apply(_symbols(p, table), ranks)
            guard = 0
            while len(syms) > 1:
                pair = (syms[0], syms[1])
                if pair in ranks:  # cannot happen with a consistent rank table; never loop on it
                    raise RuntimeError(f"BPE merge construction stuck on {p!r} at {pair}")
                ranks[pair] = len(merges)
                merges.append(pair)
                changed = True
                syms = _apply(_symbols(p, table), ranks)
                guard += 1
                if guard > 4 * len(p) + 8:
                    raise RuntimeError(f"BPE merge construction did not converge for {p!r}")
        if not changed:
            return merges
    raise RuntimeError("BPE merge construction did not converge")


def tokenizer_files(words: Iterable[str]) -> dict[str, str]:
    """The tokenizer's files as ``{file name: text}`` for the vocabulary ``words``."""
    words = list(words)
    if not words:
        raise ValueError("words must hold at least one vocabulary word, got none")
    table = byte_symbols()
    vocab: dict[str, int] = {}
    for s in table:
        vocab[s] = len(vocab)
    for s in table:
        vocab[s + END_OF_WORD] = len(vocab)
    merges = word_merges(words)
    for a, b in merges:
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    special = {"content": None, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    bos, eos = dict(special, content=BOS), dict(special, content=EOS)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": eos,
        "pad_token": EOS,
    }
    specials = {"bos_token": bos, "eos_token": eos, "unk_token": eos, "pad_token": EOS}
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False) + "\n",
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(specials, indent=2) + "\n",
    }


def world_vocabulary() -> tuple[str, ...]:
    """Every word a faces-world caption can contain (:data:`dragrt.zoo.world.VOCABULARY`)."""
    from dragrt.zoo import world

    return tuple(world.VOCABULARY)


def write_tokenizer(dest: str | os.PathLike, words: Iterable[str] | None = None) -> Path:
    """Write the tokenizer files for ``words`` (default: the world's vocabulary) into ``dest``."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, text in tokenizer_files(world_vocabulary() if words is None else words).items():
        (dest / name).write_text(text, encoding="utf-8")
    return dest


def load_tokenizer(folder: str | os.PathLike):
    """:class:`transformers.CLIPTokenizer` from ``folder``, offline."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    missing = [f for f in FILES[:2] if not (folder / f).is_file()]
    if missing:
        raise ValueError(f"tokenizer folder {str(folder)!r} lacks {', '.join(missing)}")
    tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    tok.model_max_length = MAX_LENGTH
    return tok


def build_tokenizer(dest: str | os.PathLike, words: Iterable[str] | None = None):
    """Write the tokenizer for ``words`` (default: the world's vocabulary) into ``dest`` and load it."""
    return load_tokenizer(write_tokenizer(dest, words))


def check_whole_words(tokenizer, captions: Iterable[str]) -> None:
    """Raise ``ValueError`` unless every caption tokenizes to one id per word piece, plus bos and eos, and
    decodes back to its lower-cased words."""
    for text in captions:
        ids = tokenizer(text, truncation=False)["input_ids"]
        want = pieces(text)
        if len(ids) != len(want) + 2:
            toks = tokenizer.convert_ids_to_tokens(ids)
            raise ValueError(f"caption {text!r}: {len(ids)} tokens {toks}, want {len(want)} words + bos/eos")
        back = tokenizer.decode(ids, skip_special_tokens=True)
        if pieces(back) != want:
            raise ValueError(f"caption {text!r} decodes to {back!r}")
