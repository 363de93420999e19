"""Lumina-mGPT, Liquid and Emu3: detection, decoder parity with transformers, streams and structure.

Each reference stream below is a transcription of the ALGORITHM of the model's own prompt code,
applied to the fixture's tokenizer (the whole prompt string through `tokenizers`, specials split
out as the real tokenizers do):
- Lumina-mGPT: Alpha-VLLM/Lumina-mGPT @ 250b9cf6 lumina_mgpt/generate_examples/generate.py (the
  t2i instruction), data/convertsation.py @ d897672a (each turn + "<reserved08706>"),
  xllmx/data/item_processor.py @ d897672a (bos; the image "<|image|> " at the start of the first
  question), data/item_processor.py @ 250b9cf6 (process_image: boi, grid tokens, rows + new line,
  eoi; decode_image), inference_solver.py @ 250b9cf6 (the unconditional stream is the image from its
  start token; MultiModalLogitsProcessor forces new lines and the end of the image).
- Liquid: FoundationVision/Liquid @ 4609c476 evaluation/inference_t2i.py (prompt +
  " Generate an image based on this description.<boi>", unconditional "<unconditional><boi>",
  codes = id - len(tokenizer), 1024 steps) and evaluation/inference_i2t.py +
  VQA_Eval/conversation.py (conv "gemma": "<start_of_turn>user\\n<boi><image><eoi>\\n{q}<end_of_turn>\\n
  <start_of_turn>model\\n", the image replaced by its codes + len(tokenizer)).
- Emu3: baaivision/Emu3 emu3/mllm/processing_emu3.py @ b8f8b3cf (mode G: bos + prompt + boi +
  "{H}*{W}" + img token; mode U: bos + chat template with the image rows joined by eol, + eol eof
  eoi), image_generation.py @ 005719f6 (the positive prompt appended, the negative prompt alone), utils_emu3.py @ 1b5d8213
  (Emu3PrefixConstrainedLogitsHelper: which token each generated position may be).
"""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer

from cm3leon import checkpoint, families
from cm3leon.document import DocumentCodec
from cm3leon.weights import CheckpointError
from open_families_fixture import EMU3_RESOLUTION, open_family_folder

FAMILY_NAMES = ("lumina-mgpt", "liquid", "emu3")


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def folder(request, tmp_path_factory):
    return request.param, open_family_folder(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return {name: checkpoint.load(open_family_folder(tmp_path_factory, name)) for name in FAMILY_NAMES}


def _codec(bundle) -> DocumentCodec:
    return DocumentCodec(bundle.tokenizer, bundle.vq, bundle.config, bundle.image_resolution)


def _raw(bundle) -> Tokenizer:
    return Tokenizer.from_file(str(bundle.path / "tokenizer.json"))


def _enc(raw: Tokenizer, text: str) -> list[int]:
    return raw.encode(text, add_special_tokens=False).ids


def _codes(bundle, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, bundle.config.image_codebook_size, (bundle.config.image_seq_len,), generator=g)


# ----------------------------------------------------------------------------- detection, parity
def test_family_detected_from_config_json(folder):
    name, path = folder
    info = checkpoint.inspect(path)
    assert info.family == name
    assert families.get(name).sampling  # published defaults are in the table


def test_family_override_and_unknown_family(tmp_path_factory, tmp_path):
    path = open_family_folder(tmp_path_factory, "lumina-mgpt")
    assert checkpoint.inspect(path, family="chameleon").family == "chameleon"
    cfg = json.loads((path / "config.json").read_text())
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}))
    (odd / "tokenizer.json").write_text((path / "tokenizer.json").read_text())
    with pytest.raises(CheckpointError) as e:
        checkpoint.inspect(odd)
    assert all(n in str(e.value) for n in families.FAMILIES) and "\n" not in str(e.value)
    assert cfg["architectures"] == ["ChameleonXLLMXForConditionalGeneration"]


def _reference_logits(name, path, tokens):
    if name == "liquid":
        from transformers import GemmaForCausalLM

        return GemmaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(input_ids=tokens).logits
    if name == "emu3":
        from transformers import Emu3ForConditionalGeneration

        return Emu3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()(input_ids=tokens).logits
    from transformers import ChameleonForConditionalGeneration

    hf = ChameleonForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return hf.lm_head(hf.model(input_ids=tokens).last_hidden_state)  # unmasked: HF hides image-token logits


def test_logits_equal_transformers(folder, bundles):
    name, path = folder
    bundle = bundles[name]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, bundle.config.vocab_size, (2, 16), generator=g)
    with torch.no_grad():
        ours = bundle.model(tokens)
        ref = _reference_logits(name, path, tokens)
    diff = (ours - ref).abs().max().item()
    print(f"{name}: max abs logit diff {diff:.3g}")
    assert diff <= 1e-4, diff


def test_decoder_variants_read_from_config(bundles):
    liquid, emu3 = bundles["liquid"].config, bundles["emu3"].config
    assert (liquid.mlp, liquid.norm_weight_offset, liquid.tie_embeddings, liquid.head_dim) == ("geglu", 1.0, True, 16)
    assert liquid.head_dim * liquid.n_heads != liquid.d_model and liquid.embedding_multiplier == 32 ** 0.5
    assert liquid.image_token_ids is None and liquid.image_token_offset == 256000  # len(tokenizer) + code
    assert (emu3.mlp, emu3.norm_weight_offset, emu3.qk_norm, emu3.rope_theta) == ("swiglu", 0.0, False, 1e6)
    assert emu3.bos_id == 151849 and emu3.eos_id == 151850 and emu3.image_token_id_tensor()[0] == 151854


# ----------------------------------------------------------------------------- Lumina-mGPT
def _lumina_image(vocab, codes, h, w):
    """process_image: boi, <reserved{8800+h_grids}>, <reserved{8800+w_grids}>, rows + new line, eoi."""
    img2bpe = {int("".join(str(ord(c) - ord("A")) for c in n[6:-1])): i for n, i in vocab.items()
               if n.startswith("IMGIMG")}
    grid = torch.tensor([img2bpe[int(c)] for c in codes]).view(h, w)
    rows = torch.cat([grid, torch.full((h, 1), vocab["<reserved08799>"])], dim=1).flatten().tolist()
    return [vocab["<racm3:break>"], vocab[f"<reserved{8800 + h // 2:05d}>"], vocab[f"<reserved{8800 + w // 2:05d}>"],
            *rows, vocab["<eoss>"]]


def test_lumina_streams_and_structure(bundles):
    bundle = bundles["lumina-mgpt"]
    codec, raw, vocab = _codec(bundle), _raw(bundle), bundle.tokenizer.vocab()
    h, w = codec.grid
    res = codec.resolution
    caption = "a red dog on the bench"
    instruction = f"Generate an image of {res}x{res} according to the following prompt:\n{caption}"
    ref_prompt = [vocab["<s>"]] + _enc(raw, instruction + "<reserved08706>")
    codes = _codes(bundle, 1)
    ref_image = _lumina_image(vocab, codes, h, w)
    cond = codec.stream("t2i", "cond", text=caption)
    structure = codec.image_structure()
    # the prompt ends with the image's head (boi, grid); the template holds every other token
    filled = iter(codec.codes_to_tokens(codes))
    generated = [next(filled) if t == -1 else t for t in structure]
    assert cond + generated == ref_prompt + ref_image
    assert structure.count(-1) == h * w and structure[-1] == vocab["<eoss>"]
    assert [structure[(w + 1) * r + w] for r in range(h)] == [vocab["<reserved08799>"]] * h
    # the guidance stream: the image from its start token (inference_solver.py)
    assert codec.stream("t2i", "uncond", text=caption) == ref_image[:3]
    # decode_image recovers the codes from our image tokens
    toks = codec.image_tokens(codes)[1:-1]
    assert (toks[0] - 8804, toks[1] - 8804) == (h // 2, w // 2)
    bpe2img = {i: c for c, i in enumerate(bundle.config.image_token_ids)}
    grid = torch.tensor(toks[2:]).view(h, w + 1)[:, :-1].flatten().tolist()
    assert [bpe2img[t] for t in grid] == codes.tolist()
    # caption / VQA: "<|image|> " + question + sep at the start of the first question
    question = "What color is the sky ?"
    ref_vqa = [vocab["<s>"]] + ref_image + _enc(raw, " " + question + "<reserved08706>")
    assert codec.stream("vqa", "cond", text=question, image=codes) == ref_vqa


# ----------------------------------------------------------------------------- Liquid
def test_liquid_streams(bundles):
    bundle = bundles["liquid"]
    codec, raw, vocab = _codec(bundle), _raw(bundle), bundle.tokenizer.vocab()
    n_tok = len(vocab)
    caption = "a red dog on the bench"
    bos = vocab["<bos>"]
    assert codec.stream("t2i", "cond", text=caption) == [bos] + _enc(
        raw, caption + " Generate an image based on this description.<boi>")
    assert codec.stream("t2i", "uncond", text=caption) == [bos] + _enc(raw, "<unconditional><boi>")
    assert codec.image_structure() is None and bundle.config.image_seq_len == 1024  # 1024 free codes
    codes = _codes(bundle, 2)
    assert codec.codes_to_tokens(codes) == (codes + n_tok).tolist()  # image_vq_id = token - len(tokenizer)
    question = "What color is the sky ?"
    prompt = f"<start_of_turn>user\n<boi><image><eoi>\n{question}<end_of_turn>\n<start_of_turn>model\n"
    before, after = prompt.split("<image>")
    ref = [bos] + _enc(raw, before) + (codes + n_tok).tolist() + _enc(raw, after)
    assert codec.stream("vqa", "cond", text=question, image=codes) == ref
    assert (vocab["<boi>"], vocab["<eoi>"], vocab["<unconditional>"]) == (7, 8, 9)


# ----------------------------------------------------------------------------- Emu3
def _emu3_allowed(k: int, h: int, w: int, vocab) -> int | None:
    """Emu3PrefixConstrainedLogitsHelper at the k-th generated token (offset k from the img token):
    the one forced id, or None where any visual token may be sampled."""
    if k % (w + 1) == 0:
        return vocab["<|extra_200|>"]
    if k == (w + 1) * h + 1:
        return vocab["<|extra_201|>"]
    if k == (w + 1) * h + 2:
        return vocab["<|image end|>"]
    if k == (w + 1) * h + 3:
        return vocab["<|extra_204|>"]
    return None


def test_emu3_streams_and_structure(bundles):
    bundle = bundles["emu3"]
    codec, raw, vocab = _codec(bundle), _raw(bundle), bundle.tokenizer.vocab()
    h, w = codec.grid
    assert (h, w) == (EMU3_RESOLUTION // 4, EMU3_RESOLUTION // 4)
    head = f"<|image start|>{h}*{w}<|image token|>"
    caption = "a red dog on the bench"
    positive = " masterpiece, film grained, best quality."  # image_generation.py's POSITIVE_PROMPT
    assert codec.stream("t2i", "cond", text=caption) == _enc(raw, "<|extra_203|>" + caption + positive + head)
    assert codec.stream("t2i", "uncond", text=caption) == _enc(raw, "<|extra_203|>" + families.EMU3_NEGATIVE + head)
    structure = codec.image_structure()
    assert len(structure) == (w + 1) * h + 2
    for k, t in enumerate(structure, 1):
        forced = _emu3_allowed(k, h, w, vocab)
        assert (t == -1) if forced is None else (t == forced), k
    # mode U: the image rows joined by eol, then eol eof eoi, inside the chat template
    codes = _codes(bundle, 3)
    rows = ["".join(f"<|visual token {int(c):06d}|>" for c in row) for row in codes.view(h, w)]
    image_prompt = head + "<|extra_200|>".join(rows) + "<|extra_200|><|extra_201|><|image end|>"
    question = "What color is the sky ?"
    ref = _enc(raw, "<|extra_203|>" + f"You are a helpful assistant. USER: {image_prompt}{question}. ASSISTANT:")
    assert codec.stream("vqa", "cond", text=question, image=codes) == ref


def test_emu3_vq_decodes_our_stream_as_transformers_does(bundles, tmp_path_factory):
    """Codes in our stream order -> the VQ's [h, w] grid -> image: our decode equals transformers'
    decode_image_tokens on the generated tokens (rows + eol, eof, eoi, eos)."""
    from transformers import Emu3ForConditionalGeneration

    bundle = bundles["emu3"]
    codec = _codec(bundle)
    h, w = codec.grid
    hf = Emu3ForConditionalGeneration.from_pretrained(open_family_folder(tmp_path_factory, "emu3"),
                                                      dtype=torch.float32).eval()
    codes = torch.stack([_codes(bundle, 4), _codes(bundle, 5)])
    head = len(families.split_image(codec.image_layout())[0])
    generated = torch.tensor([codec.image_tokens(c)[head:] + [bundle.config.eos_id] for c in codes])
    with torch.no_grad():
        ref = hf.model.decode_image_tokens(generated, height=h, width=w)
        ours = bundle.vq.decode(codes, (h, w))
    assert ours.shape == (2, 3, EMU3_RESOLUTION, EMU3_RESOLUTION)
    assert (ours - ref.clamp(-1, 1)).abs().max().item() <= 1e-5
    # and encoding follows transformers' image tokens, row-major
    pixels = torch.rand(2, 3, EMU3_RESOLUTION, EMU3_RESOLUTION) * 2 - 1
    with torch.no_grad():
        ref_codes = hf.model.vqmodel.encode(pixels, torch.tensor([[EMU3_RESOLUTION] * 2] * 2)).image_tokens
    assert torch.equal(bundle.vq.encode(pixels), torch.stack([t.reshape(-1) for t in ref_codes]))


# ----------------------------------------------------------------------------- defaults, command line
def test_family_sampling_defaults_are_t2i_task_defaults():
    from types import SimpleNamespace

    import tasks
    from evals.plan import family_defaults
    from tasks.spec import apply_overrides

    spec = tasks.get("coco-fid")
    liquid = family_defaults(spec, SimpleNamespace(family="liquid"), {}).sampling_config()
    assert (liquid.cfg_scale, liquid.top_k, liquid.top_p, liquid.temperature) == (7.0, 4096, 0.96, 0.99)
    user = {"generation.cfg_scale": 1.5}
    kept = family_defaults(apply_overrides(spec, user), SimpleNamespace(family="emu3"), user).sampling_config()
    assert (kept.cfg_scale, kept.top_k) == (1.5, 2048)  # the command line wins
    lumina = family_defaults(spec, SimpleNamespace(family="lumina-mgpt"), {}).sampling_config()
    assert (lumina.cfg_scale, lumina.top_k) == (4.0, 2000)
    assert family_defaults(tasks.get("vqav2"), SimpleNamespace(family="liquid"), {}) == tasks.get("vqav2")


def test_unknown_family_is_one_line_exit_2(tmp_path_factory, tmp_path, capfd):
    from evals.cli import main

    path = open_family_folder(tmp_path_factory, "emu3")
    capfd.readouterr()
    rc = main(["run", "vqav2", "--model", str(path), "--family", "gpt", "--limit", "1", "--out", str(tmp_path / "r")])
    err = capfd.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--family gpt" in err and "emu3" in err


@pytest.mark.slow  # a fresh process per load; test_logits_equal_transformers covers the same loader fast
@pytest.mark.parametrize("name", ["liquid", "emu3"])
def test_loading_host_memory_stays_within_the_bound(name, tmp_path_factory):
    """Gemma's tied head and Emu3's hub names go through the same streamed loader: peak host memory
    beyond the loaded model stays within 1.25 x the largest shard + 0.5 GiB (measured in a fresh process)."""
    from test_checkpoint_streaming import _bound, _report, measure

    r = measure(open_family_folder(tmp_path_factory, name), "float32")
    print(f"\n{name}: " + _report(r))
    assert r["overhead"] <= _bound(r), _report(r)


def test_a_kind_the_family_lacks_is_refused_by_the_plan():
    from types import SimpleNamespace

    import tasks
    from evals.plan import PlanError, check_family_templates

    with pytest.raises(PlanError, match="the liquid family has no edit prompt layout"):
        check_family_templates(tasks.get("magicbrush-edit"), SimpleNamespace(family="liquid"))
    check_family_templates(tasks.get("vqav2"), SimpleNamespace(family="emu3"))


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_readme_caption_and_vqa_commands_run_on_each_family(name, tmp_path_factory, tmp_path):
    """README's coco-caption + vqav2 command, no family flag: exit 0, finite metrics for 2 samples."""
    import math

    from evals.cli import main
    from real_fixtures import write_data_root

    data = tmp_path_factory.getbasetemp() / "open-families-data"
    if not data.is_dir():
        write_data_root(data)
    folder = open_family_folder(tmp_path_factory, name)
    vq = ["--vq", str(open_family_folder(tmp_path_factory, "lumina-mgpt").parent / "tokenizer" / "vqgan.ckpt")]
    out = tmp_path / "run"
    rc = main(["run", "coco-caption", "vqav2", "--model", str(folder), "--data-root", str(data), "--limit", "2",
               "--out", str(out), *(vq if name == "liquid" else [])])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())["tasks"]
    for task in ("coco-caption", "vqav2"):
        values = metrics[task]["metrics"]
        assert values and all(math.isfinite(m["value"]) and m["n"] == 2 for m in values.values()), values


def test_key_names_of_each_layout_map_to_one_decoder():
    from cm3leon.layouts import hf_name

    # Emu3 on the hub (convert_emu3_weights_to_hf.py) and in transformers 5's memory (conversion_mapping.py)
    for hub, mem in (("text_model.model.layers.3.self_attn.q_proj.weight", "model.text_model.layers.3.self_attn.q_proj.weight"),
                     ("text_model.model.embed_tokens.weight", "model.text_model.embed_tokens.weight"),
                     ("text_model.lm_head.weight", "lm_head.weight")):
        assert hf_name(hub) == hf_name(mem) is not None
    assert hf_name("model.layers.0.mlp.gate_proj.weight") == "layers.0.feed_forward.w1.weight"  # Gemma / Llama
    assert hf_name("vqmodel.decoder.conv_in.conv.weight") is None and hf_name("model.vqmodel.quantize.x") is None


def test_detection_rules():
    names = {"<boi>", "<eoi>", "<unconditional>"}
    assert families.from_config({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, lambda: names).name == "liquid"
    with pytest.raises(ValueError, match="known families"):  # a plain Gemma is no image model
        families.from_config({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, set)
    assert families.from_config({"model_type": "chameleon", "architectures": ["ChameleonForConditionalGeneration"]}).name \
        == "chameleon"
    assert families.from_config({"model_type": "emu3"}).name == "emu3"


# ----------------------------------------------------------------------------- README's coco-fid command
def _expected_structure(name: str, bundle) -> list[int | None]:
    """What each generated position of a sampled image must be, from the reference algorithms above
    (not from our codec): a forced id, or None where a code is sampled. Liquid forces nothing."""
    vocab = bundle.tokenizer.vocab()
    h, w = families.grid_of(bundle.config.image_seq_len)
    if name == "lumina-mgpt":  # every code 0, so each sampled position holds code 0's token
        image = _lumina_image(vocab, torch.zeros(h * w, dtype=torch.long), h, w)[3:]  # after boi + grid (prompt)
        return [None if t == image[0] else t for t in image]
    if name == "emu3":
        return [_emu3_allowed(k, h, w, vocab) for k in range(1, (w + 1) * h + 3)]
    return [None] * bundle.config.image_seq_len


@pytest.fixture(scope="module")
def fid_setup(tmp_path_factory):
    """COCO in the official layouts and random open_clip / Inception weights (tests/real_fixtures.py):
    the files README's coco-fid command names. No bank: these families are prompted without retrieval."""
    from real_fixtures import CLIP_ARCH, CLIP_FILE, INCEPTION_FILE, save_inception, save_open_clip, write_data_root

    root = tmp_path_factory.mktemp("open-families-fid")
    weights = root / "weights"
    weights.mkdir()
    return {"data": write_data_root(root / "data"),
            "clip": f"open_clip:{CLIP_ARCH}:{save_open_clip(weights / CLIP_FILE)}",
            "inception": save_inception(weights / INCEPTION_FILE)}


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_readme_coco_fid_command_runs_on_each_family(name, fid_setup, tmp_path_factory, tmp_path, monkeypatch):
    """README's coco-fid command (the registry's defaults, only file paths given, no family flag) on
    each fixture with --limit 2: exit 0, a finite FID and CLIPScore, and every sampled image stream
    (all candidates, both guidance streams share it) carries each structural token at its place."""
    import math

    from cm3leon.sampling import Sampler
    from evals.cli import main

    streams: list[list[int]] = []
    collect = Sampler.collect

    def recording_collect(self, state, plan, batch):
        if plan.modality == "image":
            streams.extend(row[:int(limit)] for row, limit in zip(state.out.tolist(), state.limits.tolist()))
        return collect(self, state, plan, batch)

    monkeypatch.setattr(Sampler, "collect", recording_collect)
    folder = open_family_folder(tmp_path_factory, name)
    # Lumina-mGPT and Liquid decode with Meta's VQGAN, named by --vq as README's commands do
    vq = None if name == "emu3" else open_family_folder(tmp_path_factory, "lumina-mgpt").parent / "tokenizer" / "vqgan.ckpt"
    out = tmp_path / "run"
    rc = main(["run", "coco-fid", "--model", str(folder), *(["--vq", str(vq)] if vq else []),
               "--data-root", str(fid_setup["data"]),
               "--set", f"generation.scorer={fid_setup['clip']}", "--set", f"metrics.fid.weights={fid_setup['inception']}",
               "--limit", "2", "--out", str(out)])
    assert rc == 0
    entry = json.loads((out / "metrics.json").read_text())["tasks"]["coco-fid"]
    assert "FID" in entry["metrics"], entry
    for m in entry["metrics"].values():
        assert math.isfinite(m["value"]) and m["n"] == 2, entry["metrics"]

    bundle = checkpoint.load(folder, vq=vq)  # the image grid is the VQ's
    image_ids = set(bundle.config.image_token_id_tensor().tolist())
    expected = _expected_structure(name, bundle)
    n_candidates = 8  # coco-fid's registry default: every candidate of both prompts was sampled
    assert len(streams) == 2 * n_candidates, len(streams)
    for row in streams:
        assert len(row) == len(expected)
        for k, (token, forced) in enumerate(zip(row, expected)):
            assert (token in image_ids) if forced is None else (token == forced), (name, k, token, forced)
    # the family's published defaults were the run's sampling settings (no flag given)
    task = json.loads((out / "coco-fid" / "config.json").read_text())["task"]
    assert {k: task["generation"][k] for k in families.get(name).sampling} == dict(families.get(name).sampling)
    assert task["retrieval"]["enabled"] is False  # never trained on retrieved documents: its own protocol


def test_a_prompt_too_long_for_the_model_is_refused_by_the_plan(tmp_path_factory, tmp_path, capfd, monkeypatch):
    """Emu3 at its 720 px default is 8,190 tokens per image in a 9,216 window: two retrieved documents
    cannot fit. The plan says so in one line, exit 2, before the model loads; without retrieval (the
    family's default) the same checkpoint passes the plan."""
    import shutil

    from evals.cli import main
    import tasks
    from evals.plan import PlanError, check_context_fits, family_defaults
    from tasks.spec import apply_overrides

    folder = tmp_path / "emu3-short"
    shutil.copytree(open_family_folder(tmp_path_factory, "emu3"), folder)
    config = json.loads((folder / "config.json").read_text())
    image_tokens = (EMU3_RESOLUTION // 4) ** 2
    config["text_config"]["max_position_embeddings"] = 2 * image_tokens + 8  # one image and its prompt fit, 3 do not
    (folder / "config.json").write_text(json.dumps(config))
    info = checkpoint.inspect(folder)
    assert info.config.max_seq_len == 2 * image_tokens + 8
    own = family_defaults(tasks.get("coco-fid"), info, {})
    check_context_fits(own, info)  # no retrieval: fits
    on = {"retrieval.k": 2, "retrieval.enabled": True}
    with pytest.raises(PlanError, match=r"coco-fid: every prompt needs at least .*--retrieval-k 0 turns retrieval off"):
        check_context_fits(family_defaults(apply_overrides(tasks.get("coco-fid"), on), info, on), info)

    def sentinel(*a, **k):
        raise AssertionError("the model was loaded before the plan refused the run")

    monkeypatch.setattr(checkpoint, "load", sentinel)
    capfd.readouterr()
    rc = main(["run", "coco-fid", "--model", str(folder), "--retrieval-k", "2", "--limit", "2",
               "--out", str(tmp_path / "run")])
    err = capfd.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "max_seq_len" in errors[0] and "Traceback" not in "\n".join(err), err


# ----------------------------------------------------------------------------- image size
def test_lumina_image_size_comes_from_its_name_or_the_flag(tmp_path_factory, tmp_path):
    """Lumina-mGPT's config.json holds no image size (the 512/768/1024 checkpoints differ only in their
    hub names; FlexARInferenceSolver is given target_size): it is read from the path, or --image-size;
    a path without it is one error naming the flag, never a silent 512."""
    import shutil

    from open_families_fixture import LUMINA_SIZE

    folder = open_family_folder(tmp_path_factory, "lumina-mgpt")
    info = checkpoint.inspect(folder)
    assert (info.image_resolution, info.config.image_seq_len) == (LUMINA_SIZE, (LUMINA_SIZE // 4) ** 2)
    renamed = tmp_path / "lumina-finetune" / "step-100"
    shutil.copytree(folder, renamed)
    with pytest.raises(CheckpointError, match=r"image size is in its name .*--image-size"):
        checkpoint.inspect(renamed)
    # an HF cache path: models--Alpha-VLLM--Lumina-mGPT-7B-64/snapshots/<sha>
    cached = tmp_path / "models--Alpha-VLLM--Lumina-mGPT-7B-64" / "snapshots" / "9624463a"
    shutil.copytree(folder, cached)
    big = checkpoint.inspect(cached)
    assert (big.image_resolution, big.config.image_seq_len) == (64, 16 * 16)
    assert "(lumina-mgpt, hf layout" in big.describe() and "images 64 px, 16x16 codes" in big.describe()  # the plan's line
    assert checkpoint.inspect(renamed, image_size=64).config.image_seq_len == 256
    with pytest.raises(CheckpointError, match=r"--image-size 36: .* multiple of 8 px"):
        checkpoint.inspect(renamed, image_size=36)  # 2 codes of 4 px per grid unit


def test_a_larger_lumina_image_is_written_and_decoded_at_its_size(tmp_path_factory, tmp_path):
    """At --image-size 64 the stream carries Lumina's grid tokens for 16 x 16 codes (8800 + 64 / 8),
    a row of 16 codes before each end of line, and the VQ decodes a 64 px image."""
    folder = open_family_folder(tmp_path_factory, "lumina-mgpt")
    bundle = checkpoint.load(folder, image_size=64, vq=folder.parent / "tokenizer" / "vqgan.ckpt")
    codec, vocab = _codec(bundle), bundle.tokenizer.vocab()
    assert codec.grid == (16, 16)
    head = codec.stream("t2i", "cond", text="a red dog")[-3:]
    assert head == [vocab["<racm3:break>"], vocab["<reserved08808>"], vocab["<reserved08808>"]]
    structure = codec.image_structure()
    assert len(structure) == 16 * 17 + 1 and structure[16] == vocab["<reserved08799>"] == structure[33]
    assert "Generate an image of 64x64 according" in bundle.tokenizer.decode(codec.stream("t2i", "cond", text="a"))
    image = codec.decode_images([_codes(bundle, 6).tolist()])[0]
    assert image.size == (64, 64)


def test_image_size_is_refused_by_a_family_trained_at_one_size(tmp_path_factory):
    with pytest.raises(CheckpointError, match=r"--image-size 64: the liquid family generates .* only"):
        checkpoint.inspect(open_family_folder(tmp_path_factory, "liquid"), image_size=64)
    emu3 = checkpoint.inspect(open_family_folder(tmp_path_factory, "emu3"), image_size=48)  # image_area's side
    assert (emu3.image_resolution, emu3.config.image_seq_len) == (48, 12 * 12)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_convert_refuses_a_family_a_native_folder_cannot_keep(name, tmp_path_factory, tmp_path, capfd):
    """A native folder carries no family (its tokenizer would be read as Chameleon's, and Lumina-mGPT's
    grid and end-of-line tokens would silently vanish from its prompts): convert says so, exit 2."""
    from evals.cli import main

    folder = open_family_folder(tmp_path_factory, name)
    capfd.readouterr()
    rc = main(["convert", str(folder), "--out", str(tmp_path / "native")])
    err = capfd.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and f"a {name} checkpoint is evaluated from its own folder" in err
    assert not (tmp_path / "native").exists()
