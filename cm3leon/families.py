"""Checkpoint families as data: special roles, stream layouts, banned text specials.

A *family* is a way of writing documents that a checkpoint was trained on. Two are known:

- ``cm3leon``: the native layout of this package (the shipped demo model). `<break>` separates
  every part, guidance streams replace text with `<mask>` (CM3leon's unconditional stream).
- ``chameleon``: Chameleon / Anole, as Meta's reference inference writes it
  (facebookresearch/chameleon, chameleon/inference/chameleon.py) and transformers'
  ChameleonProcessor: no separator between parts, the user turn ends with `<reserved08706>`
  (id 8710, HF's ``sep_token``), an image is `<racm3:break> codes <eoss>`, the unconditional
  image stream is `<s> <racm3:break>` and the image-conditioned one is the prompt filtered to
  {bos, boi, eoi, image tokens}. 8710 is an end of turn, never a mask.

A stream layout is a tuple of *slots*, read by `DocumentCodec.stream`:

  ``bos``      the bos id (left out when the vocabulary has none)
  ``context``  the context documents (retrieved documents, then in-context examples), each
               written as its parts joined by the family's separator, then `context_end`
  ``text``     the query's text part (a rendered template; may hold role placeholders)
  ``text?``    the text followed by one separator, or nothing when the text is empty
  ``image``    the query's image: boi, its codes as image tokens, eoi
  ``sep``      the family's separator between parts (`<break>` for cm3leon, none for chameleon)
  a role name  that role's id (``boi``, ``eot``, ``mask`` ...); an error when the family lacks it

An ``image_cond`` layout may instead be `FILTER`: the conditional stream filtered to
{bos, boi, eoi, image tokens} (Meta's `_split_inputs_for_cfg`).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Mapping, Protocol

# Every role a template may name as `{role}`; each family maps the ones it has to token names.
ROLES = ("bos", "eos", "pad", "unk", "boi", "eoi", "break", "eot", "mask", "infill")
ROLE_PLACEHOLDERS = frozenset(ROLES)
FILTER = "filter"  # image_cond layout: the conditional stream filtered to bos/boi/eoi/image tokens
STREAMS = ("cond", "uncond", "image_cond")
KINDS = ("t2i", "edit", "caption", "vqa", "dialog", "control")

Layout = tuple[str, ...]


class Vocabulary(Protocol):
    """What a family needs from a tokenizer (cm3leon.text.TextTokenizer has it)."""

    layout: str

    @property
    def vocab_size(self) -> int: ...

    def token_to_id(self, token: str) -> int | None: ...

    def id_to_token(self, i: int) -> str | None: ...

    def image_token_ids(self) -> list[int]: ...


@dataclass(frozen=True)
class KindLayout:
    """The streams of one task kind; None: the kind has no such stream."""

    cond: Layout
    uncond: Layout | str | None = None  # or FILTER
    image_cond: Layout | str | None = None


@dataclass(frozen=True)
class Family:
    name: str
    roles: Mapping[str, str]  # role -> token name in the vocabulary
    separator: Layout  # written between the parts of a document
    context_end: Layout  # written after each context document
    kinds: Mapping[str, KindLayout]
    # text decoding may not emit these: role names, or "angle-named" = every `<...>` token
    banned_text: tuple[str, ...] | str
    # default in-context example: None keeps the template's own wording ("... Answer: {answer}"),
    # else this string joins the query template and the answer ("{eot}": a finished user turn)
    shot_answer_join: str | None = None
    notes: str = ""
    detected_by: tuple[str, ...] = field(default_factory=tuple)  # TextTokenizer.layout values

    def layout(self, kind: str, stream: str) -> Layout | str | None:
        if kind not in self.kinds:
            raise ValueError(f"family {self.name}: no layout for task kind {kind!r} (known: {', '.join(self.kinds)})")
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")
        return getattr(self.kinds[kind], stream)

    def resolve_roles(self, vocab: Vocabulary) -> dict[str, int]:
        """role -> id, looked up by token name in the tokenizer's vocabulary (never config.json)."""
        out: dict[str, int] = {}
        for role, name in self.roles.items():
            i = vocab.token_to_id(name)
            if i is not None:
                out[role] = int(i)
        return out

    def banned_text_ids(self, vocab: Vocabulary) -> list[int]:
        """Ids text decoding must never emit.

        "angle-named" is Meta's rule: text may emit only eos and the text tokens, i.e. every
        token named `<...>` (VocabInfo.special_tokens: the name starts with "<" and is not "<"
        itself) but eos is banned, `<racm3:break>` included."""
        roles = self.resolve_roles(vocab)
        if self.banned_text == "angle-named":
            ids = {i for i in range(vocab.vocab_size)
                   if (n := vocab.id_to_token(i)) is not None and n.startswith("<") and n != "<"}
            ids.discard(roles.get("eos", -1))
        else:
            ids = {roles[r] for r in self.banned_text if r in roles}
        return sorted(ids)


NATIVE = Family(
    name="cm3leon",
    roles={"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "boi": "<image>", "eoi": "</image>",
           "break": "<break>", "eot": "<break>", "mask": "<mask>", "infill": "<infill>"},
    separator=("break",),
    context_end=("sep",),
    kinds={
        "t2i": KindLayout(cond=("bos", "context", "text", "sep", "boi"),
                          uncond=("bos", "mask", "sep", "boi")),
        "edit": KindLayout(cond=("bos", "context", "text", "sep", "image", "sep", "boi"),
                           uncond=("bos", "mask", "sep", "mask", "sep", "boi"),
                           image_cond=("bos", "mask", "sep", "image", "sep", "boi")),
        "caption": KindLayout(cond=("bos", "context", "image", "sep", "text?")),
        "vqa": KindLayout(cond=("bos", "context", "image", "sep", "text", "sep")),
        # visual dialog: the prompt every candidate answer is scored after (the VQA layout)
        "dialog": KindLayout(cond=("bos", "context", "image", "sep", "text", "sep")),
        # structure-guided generation: the condition image (an edge map), the instruction, the
        # output image; guidance keeps the condition and masks the text (ControlNet's CFG)
        "control": KindLayout(cond=("bos", "context", "image", "sep", "text", "sep", "boi"),
                              uncond=("bos", "image", "sep", "mask", "sep", "boi")),
    },
    banned_text=("eoi", "pad", "bos", "mask", "infill"),
    notes="CM3leon: <break> between parts; guidance streams replace text (and images) by <mask>.",
    detected_by=("native",),
)

CHAMELEON = Family(
    name="chameleon",
    roles={"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>", "boi": "<racm3:break>",
           "eoi": "<eoss>", "break": "<racm3:break>", "eot": "<reserved08706>"},
    separator=(),
    context_end=("eot",),
    kinds={
        # <s> instruction <reserved08706> <racm3:break>, then 1024 codes, then <eoss> (forced)
        "t2i": KindLayout(cond=("bos", "context", "text", "eot", "boi"),
                          uncond=("bos", "boi"), image_cond=FILTER),
        "edit": KindLayout(cond=("bos", "context", "text", "image", "eot", "boi"),
                           uncond=("bos", "boi"), image_cond=FILTER),
        # ChameleonProcessor: "{prompt}<image>" + sep_token, bos added by the tokenizer
        "caption": KindLayout(cond=("bos", "context", "image", "text", "eot")),
        "vqa": KindLayout(cond=("bos", "context", "image", "text", "eot")),
        "dialog": KindLayout(cond=("bos", "context", "image", "text", "eot")),
        # the condition image, then the instruction, then the output; uncond: the prompt filtered to
        # its image tokens (the condition stays, the text goes)
        "control": KindLayout(cond=("bos", "context", "image", "text", "eot", "boi"), uncond=FILTER),
    },
    banned_text="angle-named",
    shot_answer_join="{eot}",
    notes="Chameleon/Anole: Meta's reference inference; no <mask>, 8710 ends a turn.",
    detected_by=("chameleon",),
)

FAMILIES: dict[str, Family] = {f.name: f for f in (NATIVE, CHAMELEON)}


def get(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})") from None


def detect(vocab: Vocabulary) -> Family:
    """The family of a tokenizer, from its vocabulary layout (IMGIMG names: chameleon)."""
    layout = getattr(vocab, "layout", "native")
    for fam in FAMILIES.values():
        if layout in fam.detected_by:
            return fam
    raise ValueError(f"no model family for tokenizer layout {layout!r} (known: {', '.join(FAMILIES)})")


def template_roles(template: str) -> set[str]:
    """The role placeholders (`{eot}`, `{boi}` ...) a template names."""
    names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    return names & ROLE_PLACEHOLDERS


def check_template(template: str, family: Family, vocab: Vocabulary | None = None) -> None:
    """Refuse a template naming a role this family (or this vocabulary) does not have."""
    for role in sorted(template_roles(template)):
        if role not in family.roles:
            raise ValueError(f"template {template!r}: {{{role}}} is not a token of the {family.name} family "
                             f"(it has {', '.join('{' + r + '}' for r in family.roles)})")
        if vocab is not None and vocab.token_to_id(family.roles[role]) is None:
            raise ValueError(f"template {template!r}: {{{role}}} is {family.roles[role]!r}, which is not in "
                             f"the tokenizer's vocabulary")
