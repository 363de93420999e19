"""Text tokenizer: a `tokenizers` BPE plus the image-code and special tokens of one vocabulary.

Two layouts are recognised from the token names (see docs/INTERFACES.md):

- native: BPE pieces, then one token per VQ code (`<img:0>` ...), then the specials
  `<bos> <eos> <pad> <image> </image> <break> <mask> <infill>`;
- Chameleon (transformers' tokenizer.json): image tokens named `IMGIMG<letters>Z` whose
  letters A-J spell the code's decimal digits (`IMGIMGBAZ` is code 10); bos `<s>`, eos `</s>`,
  pad `<pad>`, begin-image `<racm3:break>` (which also serves as the break), end-image
  `<eoss>`, mask `<reserved08706>`; there is no infill token.
- Emu3 (transformers' conversion of BAAI/Emu3): image tokens `<|visual token NNNNNN|>`; bos
  `<|extra_203|>`, eos `<|extra_204|>`, pad `<|endoftext|>`, `<|image start|>` / `<|image end|>`.
- Liquid (a Gemma tokenizer): no image tokens by name; the checkpoint loader says how many codes
  follow the text vocabulary (`appended_codes`: code c is id len(vocabulary) + c); `<boi>` / `<eoi>`.

Specials are addressed by role ("bos", "eos", "pad", "boi", "eoi", "break", "mask", "infill").
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from .errors import Cm3evalError


class TokenizerError(Cm3evalError, ValueError):
    """A tokenizer file that cannot serve as a multimodal vocabulary (one line: file and why)."""


class TokenizerNotFoundError(Cm3evalError, FileNotFoundError):
    """No tokenizer file where one was looked for."""

ROLES = ("bos", "eos", "pad", "boi", "eoi", "break", "mask", "infill")
NATIVE_SPECIALS = {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "boi": "<image>", "eoi": "</image>",
                   "break": "<break>", "mask": "<mask>", "infill": "<infill>"}
CHAMELEON_SPECIALS = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "boi": "<racm3:break>", "eoi": "<eoss>",
                      "break": "<racm3:break>", "mask": "<reserved08706>"}
EMU3_SPECIALS = {"bos": "<|extra_203|>", "eos": "<|extra_204|>", "pad": "<|endoftext|>", "boi": "<|image start|>",
                 "eoi": "<|image end|>", "break": "<|image start|>"}
LIQUID_SPECIALS = {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "boi": "<boi>", "eoi": "<eoi>", "break": "<boi>"}
_NATIVE_IMAGE = re.compile(r"<img:(\d+)>")
_EMU3_IMAGE = re.compile(r"<\|visual token (\d+)\|>")
_CHAMELEON_PREFIX = "IMGIMG"
_DIGIT_OF = {chr(ord("A") + d): str(d) for d in range(10)}


def native_image_token(code: int) -> str:
    return f"<img:{code}>"


def chameleon_image_token(code: int) -> str:
    """Chameleon's name for a VQ code: digits spelled A-J, wrapped in IMGIMG ... Z."""
    return _CHAMELEON_PREFIX + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def chameleon_code(name: str) -> int | None:
    """Inverse of chameleon_image_token (Meta drops the last letter and reads the rest as digits)."""
    body = name[len(_CHAMELEON_PREFIX):-1]
    if not name.startswith(_CHAMELEON_PREFIX) or not body or any(c not in _DIGIT_OF for c in body):
        return None
    return int("".join(_DIGIT_OF[c] for c in body))


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, source: str = "tokenizer", *, appended_codes: int = 0) -> None:
        """`appended_codes`: the number of VQ codes whose ids follow the vocabulary (Liquid)."""
        self._tok = tokenizer
        self.source = source
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        native = {int(m.group(1)): i for name, i in vocab.items() if (m := _NATIVE_IMAGE.fullmatch(name))}
        emu3 = {int(m.group(1)): i for name, i in vocab.items() if (m := _EMU3_IMAGE.fullmatch(name))}
        cham_names = [name for name in vocab if name.startswith(_CHAMELEON_PREFIX)]
        if sum(map(bool, (native, cham_names, emu3, appended_codes))) > 1:
            raise TokenizerError(f"{source}: vocabulary mixes image-token layouts (native <img:N>, Chameleon IMGIMG, "
                                 "Emu3 <|visual token N|>, codes appended after the vocabulary)")
        if appended_codes:
            first = max(vocab.values()) + 1
            self.layout, code_to_id, names = "liquid", {c: first + c for c in range(appended_codes)}, LIQUID_SPECIALS
        elif emu3:
            self.layout, code_to_id, names = "emu3", emu3, EMU3_SPECIALS
        elif native:
            self.layout, code_to_id, names = "native", native, NATIVE_SPECIALS
        elif cham_names:
            code_to_id = {}
            for name in cham_names:
                code = chameleon_code(name)
                if code is None:
                    raise TokenizerError(f"{source}: image token {name!r} does not spell a code with letters A-J")
                if code in code_to_id:
                    raise TokenizerError(f"{source}: two image tokens name code {code}")
                code_to_id[code] = vocab[name]
            self.layout, names = "chameleon", CHAMELEON_SPECIALS
        else:
            raise TokenizerError(f"{source}: no image tokens (<img:N> or IMGIMG...) in the vocabulary; "
                             "not a multimodal tokenizer")
        n = len(code_to_id)
        if sorted(code_to_id) != list(range(n)):
            missing = sorted(set(range(n)) - set(code_to_id))[:5]
            raise TokenizerError(f"{source}: image codes are not 0..{n - 1} (missing e.g. {missing})")
        self._image_ids = [code_to_id[c] for c in range(n)]
        self._special_ids = {role: vocab[name] for role, name in names.items() if name in vocab}
        self._vocab_size = max(max(vocab.values()), max(self._image_ids, default=0)) + 1
        # decode drops image codes, our specials and any other token the file marks special
        marked = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self._skip = set(self._image_ids) | set(self._special_ids.values()) | marked
        # text that happens to spell "<image>" or "<img:3>" stays text: never a control token
        self._tok.encode_special_tokens = True

    # --- loading / saving
    @classmethod
    def from_file(cls, path: str | Path, *, appended_codes: int = 0) -> "TextTokenizer":
        path = Path(path)
        if not path.is_file():
            raise TokenizerNotFoundError(
                f"tokenizer not found: {path} (a model folder holds tokenizer.json; train one with "
                "TextTokenizer.train or take Chameleon's from its transformers checkpoint)")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TokenizerError(f"{path}: not a valid tokenizers tokenizer.json ({first})") from None
        return cls(tok, source=str(path), appended_codes=appended_codes)

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))

    @classmethod
    def train(cls, corpus: Iterable[str], n_text: int, image_codebook_size: int) -> "TextTokenizer":
        """Byte-level BPE of at most n_text pieces, then <img:0..K-1>, then the specials.

        On a small corpus BPE may stop short of n_text pieces; the layout then starts the image
        tokens right after the pieces it learned (model_config_fields reports the real offset).
        """
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if n_text < len(alphabet):
            raise ValueError(f"n_text={n_text} is smaller than the {len(alphabet)}-symbol byte alphabet")
        if image_codebook_size <= 0:
            raise ValueError(f"image_codebook_size must be positive, got {image_codebook_size}")
        tok = Tokenizer(models.BPE())
        # no prefix space and no normaliser: decode(encode(text)) == text, case kept
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=n_text, initial_alphabet=alphabet, special_tokens=[],
                                      show_progress=False)
        tok.train_from_iterator(corpus, trainer=trainer)
        n_learned = tok.get_vocab_size(with_added_tokens=True)
        extra = [native_image_token(c) for c in range(image_codebook_size)] + [NATIVE_SPECIALS[r] for r in ROLES]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
        out = cls(tok, source="trained tokenizer")
        assert out.image_token_ids() == list(range(n_learned, n_learned + image_codebook_size))
        return out

    # --- text
    def encode(self, text: str) -> list[int]:
        """Text pieces only: no bos/eos, and no control token even if the text spells one."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the pieces; image codes and specials are skipped."""
        keep = [int(i) for i in ids if int(i) not in self._skip and 0 <= int(i) < self._vocab_size]
        return self._tok.decode(keep, skip_special_tokens=True)

    # --- token space
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_ids(self) -> dict[str, int]:
        """Role ("bos", "eos", "pad", "boi", "eoi", "break", "mask", "infill") -> id; absent roles left out."""
        return dict(self._special_ids)

    @property
    def image_codebook_size(self) -> int:
        return len(self._image_ids)

    def image_token_ids(self) -> list[int]:
        """VQ code c -> token id, as a list indexed by code."""
        return list(self._image_ids)

    def vocab(self) -> dict[str, int]:
        """Every token name (added tokens included) -> id."""
        return self._tok.get_vocab(with_added_tokens=True)

    def bracketed_token_ids(self) -> list[int]:
        """Ids of every token named `<...>` (specials, reserved slots): what Chameleon's reference
        bars from text decoding. Image codes are not among them."""
        return sorted(i for name, i in self.vocab().items() if len(name) > 2 and name[0] == "<" and name[-1] == ">"
                      and not _NATIVE_IMAGE.fullmatch(name))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def model_config_fields(self) -> dict[str, Any]:
        """The ModelConfig token-space fields that match this vocabulary."""
        missing = [r for r in ("eos", "pad", "boi", "eoi", "break") if r not in self._special_ids]
        if missing:
            raise TokenizerError(f"{self.source}: no token for role(s) {missing}; cannot build a ModelConfig token space")
        ids = self._image_ids
        out: dict[str, Any] = {"vocab_size": self._vocab_size, "image_codebook_size": len(ids)}
        if ids == list(range(ids[0], ids[0] + len(ids))):
            out.update(image_token_offset=ids[0], image_token_ids=None)
        else:
            out.update(image_token_offset=0, image_token_ids=list(ids))
        for role in ROLES:
            out[f"{role}_id"] = self._special_ids.get(role)
        out["source"] = "native" if self.layout == "native" else f"{self.layout}-hf"
        return out

    def __repr__(self) -> str:
        return (f"TextTokenizer(layout={self.layout}, vocab_size={self.vocab_size}, "
                f"image_codes={self.image_codebook_size}, source={self.source!r})")

