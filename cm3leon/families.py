"""Checkpoint families as data: special roles, stream layouts, banned text specials.

A *family* is a way of writing documents that a checkpoint was trained on, detected from the
checkpoint's config.json (`architectures`, `model_type`, the tokenizer's names). Known:

- ``cm3leon``: the native layout of this package (the shipped demo model). `<break>` separates
  every part, guidance streams replace text with `<mask>` (CM3leon's unconditional stream).
- ``chameleon``: Chameleon / Anole, as Meta's reference inference writes it
  (facebookresearch/chameleon, chameleon/inference/chameleon.py) and transformers'
  ChameleonProcessor: no separator between parts, the user turn ends with `<reserved08706>`
  (id 8710, HF's ``sep_token``), an image is `<racm3:break> codes <eoss>`, the unconditional
  image stream is `<s> <racm3:break>` and the image-conditioned one is the prompt filtered to
  {bos, boi, eoi, image tokens}. 8710 is an end of turn, never a mask.
- ``lumina-mgpt``: Alpha-VLLM/Lumina-mGPT (Chameleon's decoder and vocabulary, config.json
  architectures ChameleonXLLMXForConditionalGeneration). An image is `<racm3:break>`, two grid
  tokens `<reserved{8800 + n}>` (height, width in 32-px patches), each row of codes followed by
  `<reserved08799>`, then `<eoss>` (lumina_mgpt/data/item_processor.py, FlexARItemProcessor). The
  guidance stream is the image from its start token on (inference_solver.py).
- ``liquid``: FoundationVision/Liquid (GemmaForCausalLM; the 8192 Chameleon VQGAN codes at ids
  len(tokenizer) + code; `<boi>` `<eoi>` `<unconditional>` in place of Gemma's `<unused0..2>`).
- ``emu3``: baaivision/Emu3 (Emu3ForConditionalGeneration; `<|visual token NNNNNN|>` codes). An
  image is `<|image start|>` "{H}*{W}" `<|image token|>`, each row of codes followed by
  `<|extra_200|>`, then `<|extra_201|>` `<|image end|>` (emu3/mllm/processing_emu3.py); guidance is
  a negative prompt in the same layout.

A stream layout is a tuple of *slots*, read by `DocumentCodec.stream`:

  ``bos``      the bos id (left out when the vocabulary has none)
  ``context``  the context documents (retrieved documents, then in-context examples), each
               written as its parts joined by the family's separator, then `context_end`
  ``text``     the query's text part (a rendered template; may hold role placeholders)
  ``text?``    the text followed by one separator, or nothing when the text is empty
  ``image``    the query's image: boi, its codes as image tokens, eoi
  ``sep``      the family's separator between parts (`<break>` for cm3leon, none for chameleon)
  ``image_head`` the image layout's tokens before its first code (t2i: the prompt ends with them)
  ``negative``  the family's negative prompt (Emu3's guidance stream)
  ``lit:TEXT``  TEXT through the tokenizer (chat scaffolding before a special token)
  a role name  that role's id (``boi``, ``eot``, ``mask`` ...); an error when the family lacks it

An image is written by the family's `image` layout: role names, ``codes`` (all codes in row-major
order), ``rows`` (each row of codes followed by ``eol``), ``grid`` (Lumina-mGPT's two size tokens)
and ``size`` (the text `size_text`, e.g. Emu3's "{h}*{w}"). `image_structure` turns the part after
``image_head`` into the sampler's template: -1 where a code is sampled, else the forced id.

An ``image_cond`` layout may instead be `FILTER`: the conditional stream filtered to
{bos, boi, eoi, image tokens} (Meta's `_split_inputs_for_cfg`).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol

# Every role a template may name as `{role}`; each family maps the ones it has to token names.
ROLES = ("bos", "eos", "pad", "unk", "boi", "eoi", "break", "eot", "mask", "infill", "eol", "eof", "img", "sot",
         "uncond")
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
    # --- open one-stream models: how images are written, detection, defaults
    image: Layout = ("boi", "codes", "eoi")  # see the module docstring
    size_text: str = "{h}*{w}"  # the ``size`` element (rows, columns of codes)
    grid_token: str = "<reserved{n:05d}>"  # the ``grid`` element: n = grid_base + codes // grid_codes
    grid_base: int = 8800
    grid_codes: int = 2  # codes per grid unit (Lumina-mGPT: a 32-px patch is 2 codes of 16 px)
    text_wrap: Mapping[str, str] = field(default_factory=dict)  # kind -> "...{text}..." around the query
    negative_prompt: str = ""
    architectures: tuple[str, ...] = ()  # config.json `architectures` that name this family
    model_types: tuple[str, ...] = ()  # config.json `model_type` (when no architecture matched)
    marker_token: str = ""  # with model_types: a token the tokenizer must hold (Liquid's <boi> in a Gemma)
    loader: str = "chameleon"  # which config/weights reader (cm3leon/layouts.py LOADERS)
    sampling: Mapping[str, object] = field(default_factory=dict)  # published defaults (SamplingConfig fields)
    # trained on documents with retrieved documents before them (CM3leon's recipe). False: text-to-image
    # tasks run without retrieval unless the command line sets retrieval.k / retrieval.enabled
    reads_retrieved_documents: bool = True
    # image size: a family trained at several sizes takes --image-size (any multiple of its patch);
    # `image_size_in_name`: a regex whose group 1 is the size, searched in the checkpoint path's folder
    # names when config.json holds none (Lumina-mGPT's hub names end in their size)
    flexible_image_size: bool = False
    image_size_in_name: str = ""
    image_size_example: str = ""
    sources: str = ""  # where the layouts and defaults were read (file @ commit)

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

LUMINA_MGPT = Family(
    name="lumina-mgpt",
    roles={**CHAMELEON.roles, "eol": "<reserved08799>"},
    separator=(), context_end=("eot",),
    kinds={
        # Conversation: every turn ends with <reserved08706>; the model then writes the image
        "t2i": KindLayout(cond=("bos", "context", "text", "eot", "image_head"), uncond=("image_head",)),
        # insert_implicit_media_symbol_in_q1: "<|image|> " + question, the image in place of <|image|>
        "caption": KindLayout(cond=("bos", "context", "image", "text", "eot")),
        "vqa": KindLayout(cond=("bos", "context", "image", "text", "eot")),
    },
    banned_text="angle-named", shot_answer_join="{eot}",
    image=("boi", "grid", "rows", "eoi"),
    text_wrap={"t2i": "Generate an image of {width}x{height} according to the following prompt:\n{text}",
               "caption": " {text}", "vqa": " {text}"},
    architectures=("ChameleonXLLMXForConditionalGeneration",), loader="chameleon",
    # FlexARInferenceSolver.generate: GenerationConfig(temperature, top_k=None, do_sample) and no top_p
    # (transformers' 1.0); image_top_k 2000 through InterleavedTopKLogitsWarper
    sampling={"cfg_scale": 4.0, "top_k": 2000, "top_p": 1.0, "temperature": 1.0},
    notes="Lumina-mGPT: Chameleon fine-tuned; grid tokens and end-of-line tokens inside each image.",
    flexible_image_size=True,  # FlexARItemProcessor(target_size): 512, 768 and 1024 checkpoints
    image_size_in_name=r"Lumina-mGPT-[0-9.]+B-([0-9]+)", image_size_example="Alpha-VLLM/Lumina-mGPT-7B-768",
    reads_retrieved_documents=False,  # its published protocol prompts with the caption alone
    sources="Alpha-VLLM/Lumina-mGPT lumina_mgpt/data/item_processor.py @ 250b9cf6, inference_solver.py @ 250b9cf6, "
            "generate_examples/generate.py @ 250b9cf6, data/convertsation.py @ d897672a, README.md @ 009a877f "
            "(cfg 4.0, image_top_k 2000, temperature 1.0)",
    detected_by=("lumina-mgpt",),
)

LIQUID = Family(
    name="liquid",
    roles={"bos": "<bos>", "eos": "<eos>", "pad": "<pad>", "unk": "<unk>", "boi": "<boi>", "eoi": "<eoi>",
           "uncond": "<unconditional>", "sot": "<start_of_turn>", "eot": "<end_of_turn>"},
    separator=(), context_end=(),
    kinds={
        # "{prompt} Generate an image based on this description.<boi>" / "<unconditional><boi>", bos added
        "t2i": KindLayout(cond=("bos", "context", "text", "image_head"), uncond=("bos", "uncond", "image_head")),
        # conv_templates["gemma"] with "<boi><image><eoi>\n" + question (inference_i2t.py)
        "caption": KindLayout(cond=("bos", "context", "sot", "lit:user\n", "image", "text", "eot", "lit:\n",
                                    "sot", "lit:model\n")),
        "vqa": KindLayout(cond=("bos", "context", "sot", "lit:user\n", "image", "text", "eot", "lit:\n",
                                "sot", "lit:model\n")),
    },
    banned_text=("boi", "eoi", "uncond", "pad", "bos", "sot", "unk"),
    image=("boi", "codes", "eoi"),
    text_wrap={"t2i": "{text} Generate an image based on this description.", "caption": "\n{text}",
               "vqa": "\n{text}"},
    architectures=(), model_types=("gemma",), marker_token="<boi>", loader="gemma",
    sampling={"cfg_scale": 7.0, "top_k": 4096, "top_p": 0.96, "temperature": 0.99},
    notes="Liquid: Gemma-7B with the Chameleon VQGAN codes appended after the text vocabulary.",
    reads_retrieved_documents=False,  # its published protocol prompts with the caption alone
    sources="FoundationVision/Liquid evaluation/inference_t2i.py, evaluation/inference_i2t.py, "
            "evaluation/VQA_Eval/conversation.py, TRAIN.md @ 4609c476",
    detected_by=("liquid",),
)

EMU3_POSITIVE = " masterpiece, film grained, best quality."
EMU3_NEGATIVE = ("lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
                 "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry.")
EMU3 = Family(
    name="emu3",
    roles={"bos": "<|extra_203|>", "eos": "<|extra_204|>", "pad": "<|endoftext|>", "boi": "<|image start|>",
           "eoi": "<|image end|>", "img": "<|image token|>", "eol": "<|extra_200|>", "eof": "<|extra_201|>"},
    separator=(), context_end=(),
    kinds={
        # mode "G": bos + prompt + image prefix; the negative prompt in the same layout guides
        "t2i": KindLayout(cond=("bos", "context", "text", "image_head"), uncond=("bos", "negative", "image_head")),
        # mode "U": bos + "You are a helpful assistant. USER: {image_prompt}{text_prompt}. ASSISTANT:"
        "caption": KindLayout(cond=("bos", "context", "lit:You are a helpful assistant. USER: ", "image", "text")),
        "vqa": KindLayout(cond=("bos", "context", "lit:You are a helpful assistant. USER: ", "image", "text")),
    },
    banned_text=("bos", "pad", "boi", "eoi", "img", "eol", "eof"),
    image=("boi", "size", "img", "rows", "eof", "eoi"),
    # image_generation.py appends POSITIVE_PROMPT to the user's prompt (the negative prompt is alone)
    text_wrap={"t2i": "{text}" + EMU3_POSITIVE, "caption": "{text}. ASSISTANT:", "vqa": "{text}. ASSISTANT:"},
    negative_prompt=EMU3_NEGATIVE,
    architectures=("Emu3ForConditionalGeneration",), model_types=("emu3",), loader="emu3",
    # GenerationConfig(do_sample=True, top_k=2048): temperature and top_p at transformers' 1.0
    sampling={"cfg_scale": 3.0, "top_k": 2048, "top_p": 1.0, "temperature": 1.0},
    notes="Emu3: Llama-style decoder, 32,768 visual codes, size string and end-of-line tokens in each image.",
    flexible_image_size=True,  # Emu3Processor(image_area=...): config.json's image_area is the default
    reads_retrieved_documents=False,  # its published protocol prompts with the caption alone
    sources="baaivision/Emu3 emu3/mllm/processing_emu3.py @ b8f8b3cf, image_generation.py @ 005719f6, "
            "emu3/mllm/tokenization_emu3.py @ 005719f6, emu3/mllm/utils_emu3.py @ 1b5d8213",
    detected_by=("emu3",),
)

FAMILIES: dict[str, Family] = {f.name: f for f in (NATIVE, CHAMELEON, LUMINA_MGPT, LIQUID, EMU3)}


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


def from_config(hf: Mapping[str, object], tokenizer_names: Callable[[], set[str]] = set) -> Family:
    """The family of an HF checkpoint from its config.json: `architectures` first, then `model_type`
    (with the family's marker token among `tokenizer_names()`: a Gemma is Liquid only with `<boi>`),
    Chameleon's for model_type chameleon."""
    archs = hf.get("architectures") or ()
    for fam in FAMILIES.values():
        if any(a in fam.architectures for a in archs):
            return fam
    model_type = hf.get("model_type")
    if model_type == "chameleon":
        return CHAMELEON
    for fam in FAMILIES.values():
        if model_type in fam.model_types and (not fam.marker_token or fam.marker_token in tokenizer_names()):
            return fam
    raise ValueError(f"unknown model family (config.json model_type {model_type!r}, architectures "
                     f"{list(archs)}); known families: {', '.join(FAMILIES)} (override with --family)")


def grid_of(image_seq_len: int) -> tuple[int, int]:
    """(rows, columns) of a square image of `image_seq_len` codes."""
    side = int(round(image_seq_len ** 0.5))
    if side * side != image_seq_len:
        raise ValueError(f"image_seq_len={image_seq_len} is not a square grid of codes")
    return side, side


def image_elements(family: Family, token_id: Callable[[str], int], encode: Callable[[str], list[int]],
                   h: int, w: int) -> list[list[int] | str]:
    """The family's image layout for an h x w grid: each element a list of forced ids, or the
    marker "codes" (h*w codes in row-major order) / "row" (one row of w codes). `token_id` gives the
    id of a role ("boi") or of a token name ("<reserved08816>")."""
    out: list[list[int] | str] = []
    for el in family.image:
        if el == "codes":
            out.append("codes")
        elif el == "rows":
            for _ in range(h):
                out += ["row", [token_id("eol")]]
        elif el == "grid":
            out.append([token_id(family.grid_token.format(n=family.grid_base + n // family.grid_codes))
                        for n in (h, w)])
        elif el == "size":
            out.append(encode(family.size_text.format(h=h, w=w)))
        else:
            out.append([token_id(el)])
    return out


def split_image(elements: list[list[int] | str]) -> tuple[list[int], list[list[int] | str]]:
    """(the forced ids before the first code: `image_head`, the rest)."""
    head: list[int] = []
    for i, el in enumerate(elements):
        if isinstance(el, str):
            return head, elements[i:]
        head += el
    return head, []


def image_structure(elements: list[list[int] | str], h: int, w: int) -> list[int]:
    """The sampler's template of the image after `image_head`: -1 for each sampled code, the id of
    each forced structural token (end of line, end of frame, end of image) at its place."""
    _, rest = split_image(elements)
    out: list[int] = []
    for el in rest:
        out += ([-1] * (h * w if el == "codes" else w)) if isinstance(el, str) else list(el)
    return out


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
