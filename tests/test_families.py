"""Model families: roles from the vocabulary, every stream against Meta's reference, banned specials.

The reference side below is a transcription of the ALGORITHM of Meta's inference code
(facebookresearch/chameleon, chameleon/inference/chameleon.py and vocab.py): `tokens_from_ui`
builds [bos] + text ids / [boi] image tokens [eoi] / sentinels; `ImageDecoder` appends
`<racm3:break>` when the prompt does not end with it, then splits the batch into full,
image-conditioned (the prompt filtered to image tokens, bos, boi, eoi) and unconditional
(`[bos, boi]`) streams; `TextDecoder` allows only eos and the text tokens (all ids minus image
tokens minus every `<...>` name). The caption / VQA side is also checked against transformers'
ChameleonProcessor (installed), which appends `sep_token` (8710) to the user turn.
"""

from __future__ import annotations

import pytest
import torch

from chameleon_vocab import BOI, BOS, EOI, EOS, EOT, HF_IMAGE, PAD, UNK, raw_tokenizer, text_tokenizer, vocabulary
from cm3leon import families
from cm3leon.config import ModelConfig
from cm3leon.document import Document, DocumentCodec, Special, Text


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return text_tokenizer(tmp_path_factory.mktemp("chameleon-vocab"))


@pytest.fixture(scope="module")
def codec(tok):
    cfg = ModelConfig(**tok.model_config_fields(), image_seq_len=1024, max_seq_len=8192, d_model=32, n_layers=1,
                      n_heads=2)
    return DocumentCodec(tok, None, cfg)


def _codes(seed: int) -> torch.Tensor:
    return torch.randint(0, 8192, (1024,), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- Meta's algorithm
class MetaReference:
    """Meta's reference sequences, computed from the vocabulary as chameleon/inference does."""

    def __init__(self):
        self.vocab = vocabulary()
        self.raw = raw_tokenizer()
        self.image_tokens = sorted(v for n, v in self.vocab.items() if n.startswith("IMGIMG"))
        self.special_tokens = sorted(v for n, v in self.vocab.items() if n.startswith("<") and n != "<")
        digits = {chr(ord("A") + i): str(i) for i in range(10)}
        self.img2bpe = {int("".join(digits[c] for c in n[len("IMGIMG"):-1])): v
                        for n, v in self.vocab.items() if n.startswith("IMGIMG")}

    def tokens_from_ui(self, inputs: list[tuple[str, object]]) -> list[int]:
        tokens = [self.vocab["<s>"]]
        for kind, value in inputs:
            if kind == "text":
                tokens += self.raw.encode(value).ids
            elif kind == "image":
                tokens += [self.vocab["<racm3:break>"], *[self.img2bpe[int(c)] for c in value], self.vocab["<eoss>"]]
            elif kind == "sentinel":
                tokens += [{"<START-OF-IMAGE>": self.vocab["<racm3:break>"],
                            "<END-OF-TURN>": self.vocab["<reserved08706>"]}[value]]
        return tokens

    def image_streams(self, prompt: list[int]) -> tuple[list[int], list[int], list[int]]:
        """(full, image-conditioned, unconditional), as ImageDecoder sets them up."""
        full = list(prompt)
        if full[-1] != self.vocab["<racm3:break>"]:
            full.append(self.vocab["<racm3:break>"])
        allowed = set(self.image_tokens) | {self.vocab["<s>"], self.vocab["<racm3:break>"], self.vocab["<eoss>"]}
        return full, [t for t in full if t in allowed], [self.vocab["<s>"], self.vocab["<racm3:break>"]]

    def text_allowed(self) -> list[int]:
        text_tokens = sorted(set(self.vocab.values()) - set(self.image_tokens) - set(self.special_tokens))
        return [self.vocab["</s>"]] + text_tokens


@pytest.fixture(scope="module")
def meta():
    return MetaReference()


# ----------------------------------------------------------------------------- roles and specials
def test_roles_come_from_the_vocabulary(tok, codec):
    roles = families.CHAMELEON.resolve_roles(tok)
    assert roles == {"bos": BOS, "eos": EOS, "pad": PAD, "unk": UNK, "boi": BOI, "eoi": EOI, "break": BOI,
                     "eot": EOT}
    assert "mask" not in roles  # 8710 ends a turn; Chameleon has no mask token
    assert families.detect(tok) is families.CHAMELEON and codec.family is families.CHAMELEON
    # a config that says bos_id=1 (as converted checkpoints do) does not move the stream's bos
    assert codec.stream("t2i", "uncond") == [BOS, BOI]


def test_native_family_is_detected_and_keeps_its_roles():
    from cm3leon.text import TextTokenizer

    native = TextTokenizer.train(["a red circle", "a blue square"], n_text=300, image_codebook_size=8)
    assert families.detect(native) is families.NATIVE
    s = native.special_ids
    assert families.NATIVE.resolve_roles(native) == {**s, "eot": s["break"]}


def test_text_decoding_bans_every_special_but_eos(tok, meta, codec):
    banned = set(codec.text_barred())
    image = set(meta.image_tokens)
    allowed = set(meta.text_allowed())
    # Meta: text may emit exactly eos and the text tokens; image codes are barred by the sampler's
    # modality mask, everything else named <...> by the family
    assert banned == set(range(65536)) - allowed - image
    assert {EOT, HF_IMAGE, BOI, EOI, BOS, PAD, UNK} <= banned and EOS not in banned
    assert len(banned) == len(meta.special_tokens) - 1


def test_native_banned_text_is_the_samplers_old_default():
    from cm3leon.text import TextTokenizer

    native = TextTokenizer.train(["a red circle"], n_text=300, image_codebook_size=8)
    s = native.special_ids
    assert families.NATIVE.banned_text_ids(native) == sorted(s[r] for r in ("eoi", "pad", "bos", "mask", "infill"))


# ----------------------------------------------------------------------------- streams vs Meta
def test_text_to_image_streams_match_meta(codec, meta):
    instruction = "a red bus on the grass"
    cond = codec.stream("t2i", "cond", text=instruction)
    ref_prompt = meta.tokens_from_ui([("text", instruction), ("sentinel", "<END-OF-TURN>")])
    full, image_cond, uncond = meta.image_streams(ref_prompt)
    assert cond == full == [BOS, *meta.raw.encode(instruction).ids, EOT, BOI]
    assert codec.stream("t2i", "uncond") == uncond == [BOS, BOI]
    # plain text->image: the image-conditioned stream equals the unconditional one
    assert codec.stream("t2i", "image_cond", text=instruction) == image_cond == uncond
    assert EOT not in codec.stream("t2i", "uncond")  # 8710 is never used as a mask


def test_editing_three_streams_match_meta(codec, meta):
    src = _codes(1)
    instruction = "make it a painting"
    ref_prompt = meta.tokens_from_ui([("text", instruction), ("image", src.tolist()), ("sentinel", "<END-OF-TURN>")])
    full, image_cond, uncond = meta.image_streams(ref_prompt)
    assert codec.stream("edit", "cond", text=instruction, image=src) == full
    assert codec.stream("edit", "image_cond", text=instruction, image=src) == image_cond
    assert image_cond == [BOS, BOI, *[meta.img2bpe[int(c)] for c in src], EOI, BOI]
    assert codec.stream("edit", "uncond") == uncond
    assert codec.edit_image_cond_prompt(src) == image_cond and codec.edit_uncond_prompt() == uncond


def test_caption_and_vqa_prompts_match_meta(codec, meta):
    img = _codes(2)
    question = "What color is the bus ?"
    vqa = codec.stream("vqa", "cond", text=question, image=img)
    assert vqa == meta.tokens_from_ui([("image", img.tolist()), ("text", question), ("sentinel", "<END-OF-TURN>")])
    assert codec.stream("caption", "cond", image=img) == \
        meta.tokens_from_ui([("image", img.tolist()), ("sentinel", "<END-OF-TURN>")])
    assert codec.image_to_text_prompt(img) == codec.stream("caption", "cond", image=img)
    with_prefix = codec.stream("caption", "cond", text="A photo of", image=img)
    assert with_prefix == meta.tokens_from_ui([("image", img.tolist()), ("text", "A photo of"),
                                               ("sentinel", "<END-OF-TURN>")])


def _hf_processor():
    pytest.importorskip("transformers")
    from transformers import ChameleonImageProcessor, ChameleonProcessor, PreTrainedTokenizerFast
    from tokenizers.processors import TemplateProcessing

    raw = raw_tokenizer(hf_specials=True)
    raw.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])  # Llama adds bos
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                     unk_token="<unk>", sep_token="<reserved08706>")
    return ChameleonProcessor(ChameleonImageProcessor(), hf_tok, image_seq_length=1024)


@pytest.mark.parametrize("text", ["<image>", "<image>What color is the bus ?"])
def test_caption_and_vqa_prompts_match_transformers_processor(codec, text):
    from PIL import Image

    proc = _hf_processor()
    ids = proc(text=text, images=[Image.new("RGB", (64, 64), (200, 30, 30))])["input_ids"][0].tolist()
    # the processor leaves 1024 `<image>` placeholders for the VQ codes; put the codes in their place
    img = _codes(3)
    assert ids.count(HF_IMAGE) == 1024
    first = ids.index(HF_IMAGE)
    ids[first:first + 1024] = codec.codes_to_tokens(img)
    question = text[len("<image>"):]
    kind = "vqa" if question else "caption"
    assert codec.stream(kind, "cond", text=question, image=img) == ids
    assert ids[-1] == EOT and ids[0] == BOS


def test_context_documents_end_their_turn(codec, meta):
    a, b = _codes(4), _codes(5)
    ctx = [Document(["a red bus", a]), Document(["two birds", b])]
    got = codec.stream("t2i", "cond", text="a cat", context=ctx)
    want = meta.tokens_from_ui([("text", "a red bus"), ("image", a.tolist()), ("sentinel", "<END-OF-TURN>"),
                                ("text", "two birds"), ("image", b.tolist()), ("sentinel", "<END-OF-TURN>"),
                                ("text", "a cat"), ("sentinel", "<END-OF-TURN>"), ("sentinel", "<START-OF-IMAGE>")])
    assert got == want
    # Meta's image-conditioned stream keeps every image of the prompt, context included
    _, image_cond, _ = meta.image_streams(want)
    assert codec.stream("t2i", "image_cond", text="a cat", context=ctx) == image_cond


# ----------------------------------------------------------------------------- templates by role
def test_specials_by_role_encode_to_ids_and_text_never_does(codec, meta):
    assert codec.text_ids(Text(("Question: what ?", Special("eot")))) == [*meta.raw.encode("Question: what ?").ids,
                                                                          EOT]
    # the same name spelled inside user text stays text
    assert EOT not in codec.text_ids("<reserved08706>") and BOI not in codec.text_ids("<racm3:break>")
    with pytest.raises(ValueError, match="no 'mask' token"):
        codec.text_ids(Text(("a", Special("mask"))))
    with pytest.raises(ValueError, match="unknown special role"):
        Special("end")


def test_check_template_names_roles_the_family_lacks(tok):
    families.check_template("Question: {question}{eot}", families.CHAMELEON, tok)
    families.check_template("{caption}{break}", families.NATIVE)
    with pytest.raises(ValueError, match=r"\{mask\} is not a token of the chameleon family"):
        families.check_template("{caption}{mask}", families.CHAMELEON, tok)
    assert families.template_roles("Q: {question}{eot}{boi}") == {"eot", "boi"}


def test_layout_table_covers_every_kind_and_stream():
    for fam in families.FAMILIES.values():
        # the open one-stream models publish no editing layout; every family writes the other kinds
        for kind in families.KINDS if fam in (families.NATIVE, families.CHAMELEON) else ("t2i", "caption", "vqa"):
            assert fam.layout(kind, "cond")[0] == "bos"
            if kind in ("t2i", "edit"):
                assert fam.layout(kind, "cond")[-1] in ("boi", "image_head")
                assert fam.layout(kind, "uncond") is not None
    assert families.NATIVE.layout("edit", "image_cond") == ("bos", "mask", "sep", "image", "sep", "boi")
    with pytest.raises(ValueError, match="no layout for task kind"):
        families.CHAMELEON.layout("audio", "cond")
    with pytest.raises(ValueError, match="unknown model family"):
        families.get("gpt")
