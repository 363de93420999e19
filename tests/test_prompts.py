"""tasks/prompts.py: per-kind prompts in each family's layout, without a model.

- the demo family is unchanged: the streams equal the ones the first-edition predictor built on
  the shipped demo tokenizer (tests/golden_demo_prompts.json, see tests/demo_prompt_cases.py);
- Chameleon: every stream of t2i, editing, captioning and VQA equals Meta's reference sequences
  (the reference transcription lives in tests/test_families.py), shots and retrieval end turns;
- templates name specials by role and those encode to ids.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import demo_prompt_cases as cases
from chameleon_vocab import BOI, BOS, EOS, EOT, text_tokenizer
from cm3leon import families
from cm3leon.config import ModelConfig
from cm3leon.document import Document, DocumentCodec, Special, Text
from cm3leon.sampling import SamplingConfig
from tasks import prompts
from test_families import MetaReference

GOLDEN = Path(__file__).with_name("golden_demo_prompts.json")
DEMO = Path(__file__).resolve().parents[1] / "cm3leon" / "zoo" / "shapes-demo"


# ----------------------------------------------------------------------------- templates
def test_render_without_roles_is_str_format():
    for tmpl, values in [("Question: {question} Answer:", {"question": "what {is} it?"}), ("{caption}", {"caption": "a"}),
                         ("", {}), ("{{literal}} {answer!r:>8}", {"answer": "x"})]:
        assert prompts.render(tmpl, values) == tmpl.format(**values)


def test_render_keeps_roles_as_specials():
    got = prompts.render("Question: {question}{eot}{answer}", {"question": "what?", "answer": "red"})
    assert got == Text(("Question: what?", Special("eot"), "red"))
    assert str(got) == "Question: what?red"
    assert prompts.render("{eot}", {}) == Text((Special("eot"),))
    with pytest.raises(ValueError, match=r"no value for \{caption\}"):
        prompts.render("{caption}", {})
    with pytest.raises(ValueError, match="takes no format"):
        prompts.render("{eot:>3}", {})


def test_shot_template_defaults_per_family():
    assert prompts.shot_template("vqa", "Q: {question} A:", None, families.NATIVE) == "Q: {question} A: {answer}"
    assert prompts.shot_template("caption", "", None, families.NATIVE) == "{answer}"
    assert prompts.shot_template("caption", "A photo of", None, families.NATIVE) == "A photo of {answer}"
    assert prompts.shot_template("t2i", "{caption}", None, families.NATIVE) == "{caption}"
    assert prompts.shot_template("vqa", "Q: {question} A:", None, families.CHAMELEON) == "Q: {question} A:{eot}{answer}"
    assert prompts.shot_template("t2i", "{caption}", None, families.CHAMELEON) == "{caption}{eot}"
    assert prompts.shot_template("vqa", "x", "given {answer}", families.CHAMELEON) == "given {answer}"


def test_majority_answer():
    assert prompts.majority_answer(["a", "b", "b"]) == "b"
    assert prompts.majority_answer(["a", "b"], None) == "a"  # ties: the earliest
    assert prompts.majority_answer(["a", "b"], "b") == "b"  # ties: the canonical answer first
    assert prompts.majority_answer(["a", "a", "b"], "b") == "a"  # never against the majority
    assert prompts.majority_answer([], "z") == "z"


def test_stream_count():
    guided = SamplingConfig(cfg_scale=3.0)
    assert prompts.stream_count("t2i", guided) == 2 and prompts.stream_count("t2i", SamplingConfig()) == 1
    assert prompts.stream_count("edit", SamplingConfig(cfg_scale=3.0, image_cfg_scale=1.2)) == 3
    assert prompts.stream_count("vqa", guided) == 1


# ----------------------------------------------------------------------------- the demo family, unchanged
@pytest.fixture(scope="module")
def demo_codec():
    from cm3leon.checkpoint import ModelConfig as _  # noqa: F401  (the package imports cleanly)
    from cm3leon.text import TextTokenizer

    tok = TextTokenizer.from_file(DEMO / "tokenizer.json")
    meta = json.loads((DEMO / "config.json").read_text())
    return DocumentCodec(tok, None, ModelConfig.from_dict(meta["model"]), meta["image_resolution"])


def _golden():
    data = json.loads(GOLDEN.read_text())
    if data["tokenizer_sha256"] != cases.tokenizer_hash(DEMO / "tokenizer.json"):
        pytest.skip("the shipped demo tokenizer changed: regenerate tests/golden_demo_prompts.json "
                    "(see tests/demo_prompt_cases.py)")
    return data["cases"]


def test_demo_streams_equal_the_first_edition_predictor(demo_codec):
    from evals.predictor import sampling_config

    golden = _golden()
    assert len(golden) == len(cases.CASES)
    for i, g in enumerate(golden):
        spec = cases.spec_for(g["case"])
        sample, images = cases.sample_and_images(g["case"], g["inputs"])
        shots = prompts.shot_documents(spec.kind, spec.prompt.template, spec.prompt.shot_template, sample.shots,
                                       images, demo_codec.family)
        context = cases.retrieved_docs(spec.kind, g["inputs"]["retrieved"]) + shots
        built = prompts.build(demo_codec, spec.kind, spec.prompt.template, sample.text, seed=sample.seed,
                              sampling=sampling_config(spec), max_new_tokens=spec.generation.max_new_tokens,
                              image=images.get("image"), context=context)
        r = built.request
        assert (r.prompt, r.uncond_prompt, r.image_cond_prompt, built.text) == \
            (g["prompt"], g["uncond"], g["image_cond"], g["text"]), f"case {i}: {g['case']}"
        assert r.seed == sample.seed


def test_demo_predictor_builds_the_golden_requests():
    """The same, through ModelPredictor._request on the shipped demo bundle (retrieval given)."""
    from cm3leon import checkpoint
    from evals.protocol import Item
    from evals.predictor import ModelPredictor, sampling_config

    golden = _golden()
    pred = ModelPredictor(checkpoint.load("demo"))
    assert pred.family is families.NATIVE
    for g in golden:
        spec = cases.spec_for(g["case"])
        sample, images = cases.sample_and_images(g["case"], g["inputs"])
        req, text, _ = pred._request(spec, Item(sample=sample, images=images), sampling_config(spec),
                                     (cases.retrieved_docs(spec.kind, g["inputs"]["retrieved"]), []))
        assert (req.prompt, req.uncond_prompt, req.image_cond_prompt, text) == \
            (g["prompt"], g["uncond"], g["image_cond"], g["text"])


# ----------------------------------------------------------------------------- Chameleon
@pytest.fixture(scope="module")
def cham(tmp_path_factory):
    tok = text_tokenizer(tmp_path_factory.mktemp("chameleon-vocab"))
    cfg = ModelConfig(**tok.model_config_fields(), image_seq_len=1024, max_seq_len=8192, d_model=32, n_layers=1,
                      n_heads=2)
    return DocumentCodec(tok, None, cfg)


@pytest.fixture(scope="module")
def meta():
    return MetaReference()


def _codes(seed: int) -> torch.Tensor:
    return torch.randint(0, 8192, (1024,), generator=torch.Generator().manual_seed(seed))


def test_chameleon_text_to_image_request_matches_meta(cham, meta):
    built = prompts.build(cham, "t2i", "{caption}", "a red bus", seed=3, sampling=SamplingConfig(cfg_scale=3.0),
                          max_new_tokens=32)
    full, _, uncond = meta.image_streams(meta.tokens_from_ui([("text", "a red bus"), ("sentinel", "<END-OF-TURN>")]))
    assert built.request.prompt == full and built.request.uncond_prompt == uncond == [BOS, BOI]
    assert built.request.image_cond_prompt is None and built.request.modality == "image"
    assert built.text == "a red bus"
    # no guidance: no unconditional stream at all
    assert prompts.build(cham, "t2i", "{caption}", "a", seed=0, sampling=SamplingConfig(),
                         max_new_tokens=8).request.uncond_prompt is None


def test_chameleon_edit_request_has_metas_three_streams(cham, meta):
    src = _codes(7)
    built = prompts.build(cham, "edit", "{instruction}", "make it blue", seed=1, image=src, max_new_tokens=8,
                          sampling=SamplingConfig(cfg_scale=3.0, image_cfg_scale=1.2))
    ref = meta.tokens_from_ui([("text", "make it blue"), ("image", src.tolist()), ("sentinel", "<END-OF-TURN>")])
    full, image_cond, uncond = meta.image_streams(ref)
    r = built.request
    assert (r.prompt, r.image_cond_prompt, r.uncond_prompt) == (full, image_cond, uncond)


def test_chameleon_caption_and_vqa_requests_match_meta(cham, meta):
    img = _codes(8)
    cap = prompts.build(cham, "caption", "", "", seed=0, image=img, sampling=SamplingConfig(greedy=True),
                        max_new_tokens=30)
    assert cap.request.prompt == meta.tokens_from_ui([("image", img.tolist()), ("sentinel", "<END-OF-TURN>")])
    assert cap.request.modality == "text" and cap.request.uncond_prompt is None and cap.request.max_new_tokens == 30
    vqa = prompts.build(cham, "vqa", "Question: {question} Answer:", "how many birds ?", seed=0, image=img,
                        sampling=SamplingConfig(greedy=True), max_new_tokens=10)
    assert vqa.request.prompt == meta.tokens_from_ui([("image", img.tolist()),
                                                      ("text", "Question: how many birds ? Answer:"),
                                                      ("sentinel", "<END-OF-TURN>")])
    assert vqa.text == "Question: how many birds ? Answer:"


def test_chameleon_shots_and_retrieved_documents_are_finished_turns(cham, meta):
    from tasks.loaders import Sample

    a, b, q = _codes(10), _codes(11), _codes(12)
    shot = Sample(id="s", kind="vqa", text="what color ?", references=["red", "red", "blue"])
    shots = prompts.shot_documents("vqa", "Question: {question} Answer:", None, [shot], {"shot:0": a},
                                   cham.family)
    retrieved = [prompts.retrieved_document("vqa", "two birds", b)]
    built = prompts.build(cham, "vqa", "Question: {question} Answer:", "how many ?", seed=0, image=q,
                          sampling=SamplingConfig(greedy=True), max_new_tokens=10, context=retrieved + shots)
    want = meta.tokens_from_ui([("image", b.tolist()), ("text", "two birds"), ("sentinel", "<END-OF-TURN>"),
                                ("image", a.tolist()), ("text", "Question: what color ? Answer:"),
                                ("sentinel", "<END-OF-TURN>"), ("text", "red"), ("sentinel", "<END-OF-TURN>"),
                                ("image", q.tolist()), ("text", "Question: how many ? Answer:"),
                                ("sentinel", "<END-OF-TURN>")])
    assert built.request.prompt == want


def test_a_template_can_name_the_end_of_turn(cham, meta):
    built = prompts.build(cham, "vqa", "Question: {question}{eot} Answer:", "why ?", seed=0, image=_codes(1),
                          sampling=SamplingConfig(greedy=True), max_new_tokens=4)
    tail = built.request.prompt[1 + 1026:]
    assert tail == [*meta.raw.encode("Question: why ?").ids, EOT, *meta.raw.encode(" Answer:").ids, EOT]
    # the sample's own text spelling a special stays text
    sneaky = prompts.build(cham, "t2i", "{caption}", "<reserved08706> <s> </s>", seed=0, sampling=SamplingConfig(),
                           max_new_tokens=4).request.prompt
    assert sneaky.count(EOT) == 1 and sneaky.count(BOS) == 1 and EOS not in sneaky


def test_prompt_longer_than_the_model_is_refused(cham):
    short = dataclasses.replace(cham.cfg, max_seq_len=1100)
    codec = DocumentCodec(cham.tok, None, short)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len 1100"):
        prompts.build(codec, "t2i", "{caption}", "a cat", seed=0, sampling=SamplingConfig(), max_new_tokens=4,
                      context=[Document(["a", _codes(1)])])
    with pytest.raises(ValueError, match="needs the sample's input image"):
        prompts.build(codec, "vqa", "{question}", "q", seed=0, sampling=SamplingConfig(), max_new_tokens=4)
