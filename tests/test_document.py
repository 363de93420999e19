"""Documents <-> token sequences: prompt layouts, parse round trips, the CM3 mask transform."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cm3leon.config import ModelConfig
from cm3leon.document import Document, DocumentCodec, Special, Text, cm3_mask, cm3_unmask
from cm3leon.text import TextTokenizer
from cm3leon.vq import VQConfig, VQModel, preprocess

from real_data import COCO_MINI_CAPTIONS as CAPTIONS
K, N = 16, 4  # codebook, codes per image


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    caps = [a["caption"] for a in json.loads(CAPTIONS.read_text())["annotations"]]
    return TextTokenizer.train(caps, n_text=300, image_codebook_size=K)


@pytest.fixture(scope="module")
def cfg(tok) -> ModelConfig:
    return ModelConfig(**tok.model_config_fields(), image_seq_len=N, d_model=32, n_layers=1, n_heads=2)


@pytest.fixture(scope="module")
def codec(tok, cfg) -> DocumentCodec:
    return DocumentCodec(tok, None, cfg)


def _ids(tok):
    s = tok.special_ids
    return s["bos"], s["eos"], s["boi"], s["eoi"], s["break"], s["mask"], s["infill"]


def test_prompt_layouts(codec, tok):
    bos, eos, boi, eoi, brk, mask, _ = _ids(tok)
    c1, c2 = torch.tensor([0, 5, 9, 15]), torch.tensor([3, 3, 2, 1])
    t1, t2 = tok.image_token_ids(), [tok.image_token_ids()[i] for i in (3, 3, 2, 1)]
    t1 = [t1[i] for i in (0, 5, 9, 15)]
    cap, q, instr = "A dog on a bench.", "What color is it?", "make it red"
    E = tok.encode

    assert codec.text_to_image_prompt(cap) == [bos, *E(cap), brk, boi]
    assert codec.image_to_text_prompt(c1) == [bos, boi, *t1, eoi, brk]
    assert codec.vqa_prompt(c1, q) == [bos, boi, *t1, eoi, brk, *E(q), brk]
    assert codec.edit_prompt(instr, c1) == [bos, *E(instr), brk, boi, *t1, eoi, brk, boi]
    # retrieved documents come first, each followed by <break>
    retrieved = [Document(["a cat", c2]), Document([c1, "a bird"])]
    assert codec.text_to_image_prompt(cap, retrieved) == [
        bos, *E("a cat"), brk, boi, *t2, eoi, brk, boi, *t1, eoi, brk, *E("a bird"), brk, *E(cap), brk, boi]
    # classifier-free guidance streams: text replaced by <mask>
    assert codec.uncond_image_prompt() == [bos, mask, brk, boi]
    assert codec.edit_image_cond_prompt(c1) == [bos, mask, brk, boi, *t1, eoi, brk, boi]
    assert codec.edit_uncond_prompt() == [bos, mask, brk, mask, brk, boi]
    # a finished training document ends with <eos>
    assert codec.encode(Document([cap, c1])) == [bos, *E(cap), brk, boi, *t1, eoi, eos]


def test_parse_round_trip(codec, tok):
    rng = torch.Generator().manual_seed(0)
    codes = [torch.randint(0, K, (N,), generator=rng) for _ in range(3)]
    docs = [Document(["A man riding a wave on top of a surfboard.", codes[0]]),
            Document([codes[1], "Two zebras", codes[2], "graze."]),
            Document([codes[0], codes[1]]),
            Document(["only text, with punctuation!"])]
    for doc in docs:
        assert codec.parse(codec.encode(doc)) == doc
    both = codec.encode(docs[1], retrieved=[docs[0]])
    assert codec.parse(both) == Document(docs[0].parts + docs[1].parts)
    assert codec.parse(torch.tensor(codec.encode(docs[0]))) == docs[0]  # tensors are accepted too


def test_parse_generated_fragments(codec, tok):
    bos, eos, boi, eoi, brk, _, _ = _ids(tok)
    img = tok.image_token_ids()
    cut = codec.parse([bos, *tok.encode("a cat"), brk, boi, img[7], img[2], img[9]])  # no </image>
    assert cut.parts[0] == "a cat" and torch.equal(cut.parts[1], torch.tensor([7, 2, 9]))
    after_eos = codec.parse([*tok.encode("a caption"), eos, *tok.encode("junk")])
    assert after_eos == Document(["a caption"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        codec.parse([codec.cfg.vocab_size])


def test_bad_image_parts(codec):
    with pytest.raises(ValueError, match="expected 4 codes"):
        codec.encode(Document([torch.tensor([1, 2, 3])]))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
        codec.encode(Document([torch.tensor([1, 2, 3, 16])]))
    with pytest.raises(ValueError, match="integer"):
        codec.encode(Document([torch.zeros(4)]))
    with pytest.raises(ValueError, match="no VQ tokenizer"):
        codec.encode(Document([Image.new("RGB", (8, 8))]))
    with pytest.raises(ValueError, match="codes must lie in"):
        codec.codes_to_tokens([3, -1])  # a negative index would otherwise wrap to the last code
    with pytest.raises(TypeError, match="part 0 is a int"):
        Document([3])


def test_config_disagreement_is_refused(tok, cfg):
    bad = ModelConfig(**{**tok.model_config_fields(), "eos_id": tok.special_ids["pad"]}, image_seq_len=N,
                      d_model=32, n_layers=1, n_heads=2)
    with pytest.raises(ValueError, match="eos_id"):
        DocumentCodec(tok, None, bad)


def test_pil_images_go_through_the_vq(tok, cfg):
    torch.manual_seed(0)
    vq = VQModel(VQConfig(resolution=16, base_channels=32, channel_multiplier=[1, 1, 1, 1], num_res_blocks=1,
                          latent_channels=32, embed_dim=8, num_embeddings=K)).eval()
    codec = DocumentCodec(tok, vq, cfg)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in range(2)]
    ids = codec.encode(Document(["a", imgs[0], imgs[1]]))
    got = [p for p in codec.parse(ids).parts if isinstance(p, torch.Tensor)]
    want = vq.encode(preprocess(imgs, 16))
    assert len(got) == 2 and all(torch.equal(g, w) for g, w in zip(got, want))
    out = codec.decode_images(got)
    assert [im.size for im in out] == [(16, 16), (16, 16)]
    with pytest.raises(ValueError, match="image_seq_len=4"):
        DocumentCodec(tok, vq, cfg, resolution=32)


def test_chameleon_layout(tmp_path):
    # Chameleon (real vocabulary ids): <racm3:break> begins images and no separator is written;
    # the user turn ends with <reserved08706> (8710) and the unconditional stream is <s> <racm3:break>
    # (issue 13: the first edition wrote [bos, 8710, boi], using the end of turn as a "mask").
    from chameleon_vocab import BOI, BOS, EOI, EOT, text_tokenizer

    ctok = text_tokenizer(tmp_path)
    cham = ModelConfig(**ctok.model_config_fields(), image_seq_len=N, d_model=32, n_layers=1, n_heads=2)
    codec = DocumentCodec(ctok, None, cham)
    c = torch.tensor([1, 2, 3, 4])
    t = codec.codes_to_tokens(c)
    assert codec.text_to_image_prompt("a cat") == [BOS, *ctok.encode("a cat"), EOT, BOI]
    assert codec.image_to_text_prompt(c) == [BOS, BOI, *t, EOI, EOT]
    assert codec.uncond_image_prompt() == [BOS, BOI]
    doc = Document(["a cat", c, "sleeps"])
    assert codec.encode(doc) == [BOS, *ctok.encode("a cat"), BOI, *t, EOI, *ctok.encode("sleeps"), cham.eos_id]
    assert codec.parse(codec.encode(doc)) == doc


def test_text_parts_with_specials(codec, tok):
    bos, eos, boi, eoi, brk, mask, _ = _ids(tok)
    part = Text(("Question: what?", Special("break"), "red"))
    assert codec.text_ids(part) == [*tok.encode("Question: what?"), brk, *tok.encode("red")]
    assert codec.encode(Document([part]), eos=False) == [bos, *codec.text_ids(part)]
    assert Document([part]).texts == ["Question: what?red"] and Document([part]).images == []
    assert Document([part]) == Document([Text(("Question: what?", Special("break"), "red"))])
    assert not Text(("",)) and Text((Special("eot"),))
    with pytest.raises(TypeError, match="expected str or Special"):
        Text((3,))


def _training_doc(codec, tok, seed):
    g = torch.Generator().manual_seed(seed)
    doc = Document(["A plane floating on top of a lake.", torch.randint(0, K, (N,), generator=g),
                    "Lake or river beach with plane in shallow water."])
    return codec.encode(doc, retrieved=[Document(["a red bus", torch.randint(0, K, (N,), generator=g)])])


def test_cm3_mask_is_reconstructable_and_respects_breaks(codec, tok, cfg):
    bos, eos, boi, eoi, brk, mask, infill = _ids(tok)
    barriers = {bos, eos, boi, eoi, brk}
    image_ids = set(tok.image_token_ids())
    covered_image = False
    for seed in range(200):
        ids = _training_doc(codec, tok, seed)
        out = cm3_mask(ids, np.random.default_rng(seed), cfg=cfg)
        assert cm3_unmask(out, cfg) == ids
        assert out[-1] == eos and out.count(infill) == 1
        body, tail = out[: out.index(infill)], out[out.index(infill) + 1: -1]
        spans, cur = [], None
        for t in tail:
            if t == mask:
                cur = []
                spans.append(cur)
            else:
                cur.append(t)
        assert len(spans) == body.count(mask) >= 1 and all(spans)
        for span in spans:
            assert not barriers & set(span)  # never crosses <break>, never takes <image>/</image>
            covered_image |= bool(image_ids & set(span))
        # the same tokens, only moved: every boi/eoi/break stays in the body, in place
        assert sorted(t for t in out if t not in (mask, infill)) == sorted(ids)
        assert [t for t in body if t in barriers] == [t for t in ids if t in barriers and t != eos]
    assert covered_image  # spans do reach inside images


def test_cm3_mask_is_deterministic(codec, tok, cfg):
    ids = _training_doc(codec, tok, 0)
    a = [cm3_mask(ids, np.random.default_rng(s), cfg=cfg) for s in range(20)]
    b = [codec.cm3_mask(ids, s) for s in range(20)]  # an int seed means default_rng(seed)
    assert a == b
    assert len({tuple(x) for x in a}) > 10  # and the seed matters


def test_cm3_mask_span_count_and_edge_cases(codec, tok, cfg):
    bos, eos, boi, eoi, brk, mask, infill = _ids(tok)
    ids = _training_doc(codec, tok, 1)
    out = cm3_mask(ids, np.random.default_rng(3), 3, cfg=cfg, max_span_len=2)
    assert out[: out.index(infill)].count(mask) == 3
    assert cm3_unmask(out, cfg) == ids
    only_specials = [bos, brk, boi, eoi, eos]
    assert cm3_mask(only_specials, np.random.default_rng(0), cfg=cfg) == only_specials
    with pytest.raises(ValueError, match="already holds"):
        cm3_mask(out, np.random.default_rng(0), cfg=cfg)
