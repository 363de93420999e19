"""Chameleon's REAL vocabulary layout (65,536 ids) as a tokenizer.json, for prompt-layout tests.

Ids as in the release (../shared/REFERENCE.md): 0 `<s>`, 1 `<pad>`, 2 `</s>`, 3 `<unk>`; 4..8195
the 8192 `IMGIMG<A-J digits>Z` image tokens (ids in name order); 8196 `<eoss>`; 8197
`<racm3:break>`; `<reservedNNNNN>` = id NNNNN + 4 from 8198, with HF's rename of `<reserved08707>`
to `<image>` (8711); then text words, then filler pieces up to 65,536 ids. The text model is a
WordLevel over whitespace/punctuation words: enough to compare token sequences exactly.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from cm3leon.text import TextTokenizer, chameleon_image_token

VOCAB_SIZE = 65536
N_CODES = 8192
BOS, PAD, EOS, UNK, EOI, BOI, EOT, HF_IMAGE = 0, 1, 2, 3, 8196, 8197, 8710, 8711
LAST_RESERVED = 9003  # <reserved08999>
WORDS = ("a", "an", "the", "dog", "cat", "on", "bench", "red", "make", "it", "sky", "blue", "What", "color",
         "is", "?", "Question", "Answer", ":", "A", "photo", "of", "two", "birds", "sleeps", "bus", "yes", "no",
         "how", "many", "are", "there", "3", ".", ",", "Turn", "into", "painting", "grass", "green")


def vocabulary() -> dict[str, int]:
    names = ["<s>", "<pad>", "</s>", "<unk>"]
    names += sorted(chameleon_image_token(c) for c in range(N_CODES))
    names += ["<eoss>", "<racm3:break>"]
    for i in range(len(names), LAST_RESERVED + 1):
        names.append("<image>" if i == HF_IMAGE else f"<reserved{i - 4:05d}>")
    names += list(WORDS)
    names += [f"w{i}" for i in range(VOCAB_SIZE - len(names))]
    vocab = {n: i for i, n in enumerate(names)}
    assert len(vocab) == VOCAB_SIZE and vocab["<reserved08706>"] == EOT and vocab["<racm3:break>"] == BOI
    return vocab


def raw_tokenizer(*, hf_specials: bool = False) -> Tokenizer:
    """The tokenizers object; `hf_specials` marks the specials as added tokens (what
    transformers' processor needs to read `<image>` and the sep token inside a string)."""
    tok = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if hf_specials:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in ("<s>", "<pad>", "</s>", "<unk>", "<eoss>", "<racm3:break>",
                                          "<reserved08706>", "<image>")])
    return tok


def text_tokenizer(tmp_path: Path) -> TextTokenizer:
    path = tmp_path / "tokenizer.json"
    raw_tokenizer().save(str(path))
    return TextTokenizer.from_file(path)
