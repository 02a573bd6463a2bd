"""zoo.text: our own CLIP tokenizer built from the faces-world caption vocabulary."""

from __future__ import annotations

import json

import pytest

from dragrt.zoo import text as ztext
from dragrt.zoo import world


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faces-tokenizer")
    return ztext.build_tokenizer(folder), folder


def _captions(n: int) -> list[str]:
    return [world.caption(world.sample_params(s)) for s in range(n)] + [
        world.caption(world.sample_params(s)) for s in world.held_out_seeds(50)
    ]


def test_loads_offline_as_clip_tokenizer_with_sd_length(tokenizer):
    from transformers import CLIPTokenizer

    tok, folder = tokenizer
    assert isinstance(tok, CLIPTokenizer)
    assert sorted(p.name for p in folder.iterdir()) == sorted(ztext.FILES)
    again = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert again.model_max_length == ztext.MAX_LENGTH == 77
    ids = again(["a smile"], padding="max_length", max_length=77)["input_ids"][0]
    assert len(ids) == 77 and ids[0] == again.bos_token_id and set(ids[3:]) == {again.eos_token_id}
    assert again.pad_token_id == again.eos_token_id == again.unk_token_id == len(again) - 1
    assert again.bos_token_id == len(again) - 2
    # small and ours: 512 byte symbols, the merges, two specials (SD's has 49408)
    assert len(again) < 1000


def test_every_caption_is_one_token_per_word(tokenizer):
    tok, _ = tokenizer
    captions = _captions(400)
    ztext.check_whole_words(tok, captions)
    for c in captions[:50]:
        ids = tok(c)["input_ids"]
        assert len(ids) == len(world.caption_tokens(c)) + 2
        assert tok.decode(ids, skip_special_tokens=True).replace(" ,", ",") == c
    longest = max(len(tok(c)["input_ids"]) for c in captions)
    assert longest <= ztext.MAX_LENGTH


def test_every_vocabulary_word_is_a_single_token(tokenizer):
    tok, _ = tokenizer
    vocab = tok.get_vocab()
    for w in world.VOCABULARY:
        assert tok.tokenize(w) == [w + ztext.END_OF_WORD], w
        assert w + ztext.END_OF_WORD in vocab


def test_unknown_words_fall_back_to_pieces_not_unk(tokenizer):
    tok, _ = tokenizer
    toks = tok.tokenize("zebra moustaches 42!")
    assert tok.unk_token not in toks
    assert "".join(toks).replace(ztext.END_OF_WORD, "") == "zebramoustaches42!"
    assert tok.tokenize("Smile") == ["smile</w>"]  # lower-cased like CLIP


def test_pieces_match_the_tokenizer_split():
    assert ztext.pieces("A  Cap, on a RED background") == ["a", "cap", ",", "on", "a", "red", "background"]
    assert ztext.pieces("x12") == ["x", "1", "2"]


def test_files_are_deterministic_and_byte_level():
    words = ("glasses", "cap", "a", ",")
    a, b = ztext.tokenizer_files(words), ztext.tokenizer_files(reversed(words))
    assert a == b
    vocab = json.loads(a["vocab.json"])
    assert list(vocab)[:256] == ztext.byte_symbols()
    assert len(set(ztext.byte_symbols())) == 256
    assert list(vocab.values()) == list(range(len(vocab)))
    assert a["merges.txt"].startswith("#version")
    lines = a["merges.txt"].splitlines()[1:]
    assert all(len(line.split(" ")) == 2 for line in lines)


def test_merges_survive_words_that_share_endings():
    # "lue" would win over "blue" under a naive merge list; the construction checks every word
    words = ["lue", "blue", "ue", "e", "blues", "bluebell", "bell", "ell"]
    merges = ztext.word_merges(words)
    ranks = {m: i for i, m in enumerate(merges)}
    table = ztext.byte_symbols()
    for w in words:
        assert ztext._apply(ztext._symbols(w, table), ranks) == [w + ztext.END_OF_WORD]


def test_rejects_an_empty_vocabulary():
    with pytest.raises(ValueError, match="at least one"):
        ztext.tokenizer_files([])


def test_check_whole_words_reports_a_split_word(tmp_path):
    tok = ztext.build_tokenizer(tmp_path, ["a", "cap"])
    with pytest.raises(ValueError, match="tokens"):
        ztext.check_whole_words(tok, ["a cap with glasses"])
