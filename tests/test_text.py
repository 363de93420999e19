"""Text tokenizer: native training on real COCO captions, and Chameleon's IMGIMG vocabulary."""

import json
import random
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from cm3leon.config import ModelConfig
from cm3leon.text import ROLES, TextTokenizer, chameleon_code, chameleon_image_token

from real_data import COCO_MINI_CAPTIONS as CAPTIONS


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return [a["caption"] for a in json.loads(CAPTIONS.read_text())["annotations"]]


@pytest.fixture(scope="module")
def native(captions) -> TextTokenizer:
    return TextTokenizer.train(captions, n_text=512, image_codebook_size=64)


def test_native_layout(native):
    n = native.model_config_fields()["image_token_offset"]
    assert 256 < n <= 512  # at least the byte alphabet plus some merges, at most what was asked
    assert native.layout == "native"
    assert native.image_token_ids() == list(range(n, n + 64))
    assert [native.special_ids[r] for r in ROLES] == list(range(n + 64, n + 64 + len(ROLES)))
    assert native.vocab_size == n + 64 + len(ROLES)
    assert native.id_to_token(n + 10) == "<img:10>" and native.id_to_token(native.special_ids["break"]) == "<break>"


def test_round_trip_real_captions(native, captions):
    assert len(captions) == 120  # the vendored COCO-mini subset (tests/data/LICENSES.md)
    for c in captions:
        ids = native.encode(c)
        assert ids and max(ids) < native.image_token_ids()[0]  # text pieces only
        assert native.decode(ids) == c
    # BPE actually compresses: fewer pieces than bytes
    assert sum(len(native.encode(c)) for c in captions) < 0.6 * sum(len(c.encode()) for c in captions)
    assert native.encode("A Cat") != native.encode("a cat")  # case is kept


def test_control_tokens_never_come_from_text(native):
    text = "draw <image> then <img:3> and <eos> <break>"
    ids = native.encode(text)
    controls = set(native.image_token_ids()) | set(native.special_ids.values())
    assert not controls & set(ids)
    assert native.decode(ids) == text


def test_decode_skips_images_and_specials(native):
    s = native.special_ids
    ids = [s["bos"], *native.encode("a dog"), s["break"], s["boi"], *native.image_token_ids()[:5], s["eoi"],
           *native.encode(" runs"), s["eos"]]
    assert native.decode(ids) == "a dog runs"


def test_save_load_equal(native, captions, tmp_path):
    native.save(tmp_path / "tokenizer.json")
    again = TextTokenizer.from_file(tmp_path / "tokenizer.json")
    assert again.vocab_size == native.vocab_size
    assert again.special_ids == native.special_ids
    assert again.image_token_ids() == native.image_token_ids()
    assert all(again.encode(c) == native.encode(c) for c in captions)
    assert again.model_config_fields() == native.model_config_fields()


def test_model_config_fields_build_a_model_config(native):
    cfg = ModelConfig(**native.model_config_fields(), d_model=32, n_layers=1, n_heads=2)
    assert cfg.image_token_id_tensor().tolist() == native.image_token_ids()
    assert cfg.mask_id == native.special_ids["mask"] and cfg.infill_id == native.special_ids["infill"]


def test_train_rejects_bad_sizes(captions):
    with pytest.raises(ValueError, match="byte alphabet"):
        TextTokenizer.train(captions, n_text=100, image_codebook_size=16)


def _fake_chameleon(path: Path, n_codes: int = 120, seed: int = 0) -> dict[str, int]:
    """Chameleon-shaped vocab: <s> <pad> </s> <unk>, IMGIMG names at shuffled ids, its specials, some words."""
    rng = random.Random(seed)
    names = [chameleon_image_token(c) for c in range(n_codes)]
    rng.shuffle(names)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for name in names:
        vocab[name] = len(vocab)
    for name in ("<eoss>", "<racm3:break>", "<reserved08706>", "a", "cat", "on", "the", "mat", "."):
        vocab[name] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in
                            ("<s>", "<pad>", "</s>", "<unk>", "<eoss>", "<racm3:break>", "<reserved08706>")])
    tok.save(str(path))
    return vocab


def test_chameleon_image_names():
    assert chameleon_image_token(10) == "IMGIMGBAZ" and chameleon_code("IMGIMGBAZ") == 10
    assert chameleon_code("IMGIMGJJJJZ") == 9999 and chameleon_code("IMGIMGAZ") == 0
    assert chameleon_code("IMGIMGKZ") is None


def test_chameleon_layout(tmp_path):
    from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping

    vocab = _fake_chameleon(tmp_path / "tokenizer.json")
    tok = TextTokenizer.from_file(tmp_path / "tokenizer.json")
    assert tok.layout == "chameleon" and tok.image_codebook_size == 120
    assert tok.image_token_ids()[10] == vocab["IMGIMGBAZ"]
    ref = ChameleonImageVocabularyMapping(vocab).bpe2img  # transformers: token id -> code
    assert {tid: code for code, tid in enumerate(tok.image_token_ids())} == ref
    assert tok.special_ids == {"bos": 0, "pad": 1, "eos": 2, "eoi": vocab["<eoss>"], "boi": vocab["<racm3:break>"],
                               "break": vocab["<racm3:break>"], "mask": vocab["<reserved08706>"]}
    ids = tok.encode("a cat on the mat")
    assert ids == [vocab[w] for w in "a cat on the mat".split()]
    assert tok.decode([0, *ids, vocab["<racm3:break>"], *tok.image_token_ids()[:4], vocab["<eoss>"], 2]) == \
        "a cat on the mat"

    fields = tok.model_config_fields()
    assert fields["image_token_ids"] == tok.image_token_ids()  # shuffled, so an explicit list
    assert fields["infill_id"] is None and fields["break_id"] == fields["boi_id"]
    assert fields["source"] == "chameleon-hf"
    cfg = ModelConfig(**fields, d_model=32, n_layers=1, n_heads=2)
    table = cfg.token_to_code_tensor()
    assert all(int(table[tid]) == code for tid, code in ref.items())


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothere\.json"):
        TextTokenizer.from_file(tmp_path / "nothere.json")
    (tmp_path / "broken.json").write_text('{"model": ')
    with pytest.raises(ValueError, match=r"broken\.json: not a valid tokenizers tokenizer\.json"):
        TextTokenizer.from_file(tmp_path / "broken.json")
    plain = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    plain.save(str(tmp_path / "plain.json"))
    with pytest.raises(ValueError, match=r"plain\.json: no image tokens"):
        TextTokenizer.from_file(tmp_path / "plain.json")
    vocab = {"<unk>": 0, chameleon_image_token(0): 1, chameleon_image_token(2): 2}
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(tmp_path / "gap.json"))
    with pytest.raises(ValueError, match=r"gap\.json: image codes are not 0\.\.1"):
        TextTokenizer.from_file(tmp_path / "gap.json")


def test_chameleon_vocabulary_roles_and_bracketed_specials(tmp_path):
    from chameleon_fixture import EOT_ID, HF_IMAGE_ID, chameleon_vocab, write_tokenizer

    write_tokenizer(chameleon_vocab(hf=True), tmp_path / "tokenizer.json")
    tok = TextTokenizer.from_file(tmp_path / "tokenizer.json")
    assert tok.layout == "chameleon" and tok.vocab_size == 65536
    assert tok.special_ids["bos"] == 0 and tok.special_ids["eos"] == 2 and tok.special_ids["pad"] == 1
    assert tok.special_ids["boi"] == 8197 and tok.special_ids["eoi"] == 8196
    barred = tok.bracketed_token_ids()
    assert {0, 1, 2, 3, 8196, 8197, EOT_ID, HF_IMAGE_ID} <= set(barred)
    assert not set(barred) & set(tok.image_token_ids())
    assert len(barred) == 4 + 2 + (8999 - 8198 + 1)  # <s> <pad> </s> <unk>, <eoss> <racm3:break>, the reserved block
    assert tok.vocab()["<reserved08706>"] == EOT_ID
