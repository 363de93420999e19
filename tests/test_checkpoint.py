"""Checkpoints: Chameleon (HF layout) import parity with transformers, native round trip, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models

from cm3leon import checkpoint, vq as vq_lib
from cm3leon.config import ModelConfig
from cm3leon.errors import Cm3evalError
from cm3leon.text import TextTokenizer
from cm3leon.transformer import Transformer

transformers = pytest.importorskip("transformers")

from chameleon_fixture import N_CODES, N_TEXT, hf_folder, hf_model as _hf_model  # noqa: E402,F401

def _mixed_batch(cfg: ModelConfig):
    """Left-padded sequences of text, <racm3:break> image codes <eoss>, text."""
    g = torch.Generator().manual_seed(3)
    img_ids = torch.tensor(cfg.image_token_ids)
    text_lo = cfg.vocab_size - N_TEXT
    seqs = []
    for n_text, n_img in ((5, 12), (2, 6), (9, 3)):
        s = [cfg.bos_id] + torch.randint(text_lo, cfg.vocab_size, (n_text,), generator=g).tolist()
        s += [cfg.boi_id] + img_ids[torch.randint(0, N_CODES, (n_img,), generator=g)].tolist() + [cfg.eoi_id]
        s += torch.randint(text_lo, cfg.vocab_size, (3,), generator=g).tolist()
        seqs.append(s)
    T = max(map(len, seqs))
    tokens = torch.full((len(seqs), T), cfg.pad_id)
    valid = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, T - len(s):] = torch.tensor(s)
        valid[i, T - len(s):] = True
    return tokens, valid


def test_chameleon_import_matches_transformers_logits(hf_folder):
    bundle = checkpoint.load(hf_folder)
    hf = _hf_model(hf_folder)
    tokens, valid = _mixed_batch(bundle.config)
    position_ids = (valid.long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        hidden = hf.model(input_ids=tokens, attention_mask=valid.long(), position_ids=position_ids).last_hidden_state
        ref = hf.lm_head(hidden)  # unmasked: HF's forward hides image-token logits, we compare all columns
        ours = bundle.model(tokens, valid)
    diff = (ours - ref)[valid].abs().max().item()
    assert diff <= 1e-4, diff
    # and HF's own forward on the text columns it does not mask
    with torch.no_grad():
        hf_logits = hf(input_ids=tokens, attention_mask=valid.long(), position_ids=position_ids).logits
    text_cols = ~bundle.config.is_image_token_mask()
    assert (ours[..., text_cols] - hf_logits[..., text_cols])[valid].abs().max().item() <= 1e-4


def test_chameleon_image_vocabulary_mapping_matches_transformers(hf_folder):
    bundle = checkpoint.load(hf_folder)
    hf = _hf_model(hf_folder)
    codes = torch.arange(N_CODES)
    expected = hf.model.vocabulary_mapping.convert_img2bpe(codes)
    assert bundle.config.image_token_id_tensor().tolist() == expected.tolist()
    assert bundle.tokenizer.image_token_ids() == expected.tolist()


def test_chameleon_vq_codes_equal_transformers(hf_folder):
    bundle = checkpoint.load(hf_folder)
    hf = _hf_model(hf_folder)
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        ref = hf.model.vqmodel.encode(pixels, return_dict=True).image_tokens.view(3, -1)
        ours = bundle.vq.encode(pixels)
    assert torch.equal(ours, ref)
    assert bundle.config.image_seq_len == ours.shape[1]


# ----------------------------------------------------------------------------- native format
@pytest.fixture(scope="module")
def native_bundle() -> checkpoint.ModelBundle:
    tok = TextTokenizer.train(["a red circle on the left", "two blue squares", "what color is it"] * 20,
                              n_text=300, image_codebook_size=16)
    fields = tok.model_config_fields()
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=128, qk_norm=True, image_seq_len=16, **fields)
    torch.manual_seed(0)
    vq = vq_lib.VQModel(vq_lib.VQConfig(resolution=16, base_channels=32, channel_multiplier=[1, 1, 2],
                                        num_res_blocks=1, attn_resolutions=[], latent_channels=4, embed_dim=4,
                                        num_embeddings=16)).eval()
    return checkpoint.ModelBundle(cfg, Transformer(cfg).eval(), tok, vq, 16)


def test_native_round_trip_bitwise(native_bundle, tmp_path):
    folder = checkpoint.save(native_bundle, tmp_path / "m")
    loaded = checkpoint.load(folder)
    tokens = torch.randint(0, native_bundle.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(native_bundle.model(tokens), loaded.model(tokens))
        px = torch.rand(1, 3, 16, 16) * 2 - 1
        assert torch.equal(native_bundle.vq.encode(px), loaded.vq.encode(px))
    assert loaded.config == native_bundle.config
    assert loaded.fingerprint and loaded.fingerprint == checkpoint.load(folder).fingerprint


def test_truncated_safetensors_names_the_file(native_bundle, tmp_path):
    folder = checkpoint.save(native_bundle, tmp_path / "m")
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated or corrupt"):
        checkpoint.load(folder)


def test_shape_mismatch_names_the_tensor(native_bundle, tmp_path):
    folder = checkpoint.save(native_bundle, tmp_path / "m")
    meta = json.loads((folder / "config.json").read_text())
    meta["model"]["d_ff"] = 64  # weights were saved with another d_ff
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor layers\.0\.feed_forward\.w1\.weight has shape"):
        checkpoint.load(folder)


def test_missing_tokenizer_names_the_file(native_bundle, tmp_path):
    folder = checkpoint.save(native_bundle, tmp_path / "m")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json: tokenizer missing"):
        checkpoint.load(folder)


def test_pickle_that_is_not_plain_weights_is_refused(tmp_path):
    class NotWeights:  # any object beyond tensors and containers: weights_only must refuse it
        def __reduce__(self):
            return (print, ("this would run on load",))

    ckpt = tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "evil": NotWeights()}, ckpt)
    cfg = vq_lib.VQConfig(resolution=16, base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1,
                          latent_channels=4, embed_dim=4, num_embeddings=16)
    with pytest.raises(ValueError, match=r"vqgan\.ckpt: refused to load: not a plain-weights checkpoint"):
        vq_lib.load_taming_checkpoint(ckpt, cfg)


def test_unknown_folder_and_demo_alias_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        checkpoint.load(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        checkpoint.load(tmp_path / "x")


# ----------------------------------------------------------------------------- the real Chameleon layout
from chameleon_fixture import EOT_ID, HF_IMAGE_ID, N_SHARDS, VOCAB_SIZE, meta_release, meta_vq  # noqa: E402,F401


def _logits(bundle, tokens):
    with torch.no_grad():
        return bundle.model(tokens)


def test_fixture_has_the_real_vocabulary_and_shards(hf_folder):
    index = json.loads((hf_folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == N_SHARDS == len(list(hf_folder.glob("model-*.safetensors")))
    assert not any(".decoder." in k for k in index["weight_map"])  # as transformers' conversion leaves it
    tok = TextTokenizer.from_file(hf_folder / "tokenizer.json")
    assert tok.vocab_size == VOCAB_SIZE == 65536
    ids = {n: tok.token_to_id(n) for n in ("<s>", "<pad>", "</s>", "<eoss>", "<racm3:break>", "<reserved08706>", "<image>")}
    assert ids == {"<s>": 0, "<pad>": 1, "</s>": 2, "<eoss>": 8196, "<racm3:break>": 8197,
                   "<reserved08706>": EOT_ID, "<image>": HF_IMAGE_ID}
    assert sorted(tok.image_token_ids()) == list(range(4, 8196))


def test_bos_comes_from_the_vocabulary_with_a_warning_naming_both(hf_folder):
    with pytest.warns(checkpoint.CheckpointWarning, match=r"bos_token_id=1 disagrees with the tokenizer's <s>=0"):
        info = checkpoint.inspect(hf_folder)
    assert (info.config.bos_id, info.config.eos_id, info.config.pad_id) == (0, 2, 1)
    assert (info.config.boi_id, info.config.eoi_id) == (8197, 8196)


def test_inspect_reads_no_tensor_data(hf_folder, monkeypatch):
    import cm3leon.weights as w

    def no_data(*a, **k):
        raise AssertionError("inspect read tensor data")

    monkeypatch.setattr(w, "iter_safetensors", no_data)
    monkeypatch.setattr(w, "read_safetensors", no_data)
    monkeypatch.setattr(torch, "load", no_data)
    info = checkpoint.inspect(hf_folder)
    assert (info.layout, info.family, info.dtype) == ("hf", "chameleon", "F32")
    assert len(info.files) == N_SHARDS and info.largest_file_bytes == max(f.stat().st_size for f in info.files)
    assert info.has_vq_encoder and not info.has_vq_decoder and not info.has_encoder and not info.has_bank
    hf = _hf_model(hf_folder)
    n_hf = sum(p.numel() for n, p in hf.named_parameters() if "vqmodel" not in n)
    assert info.n_params == n_hf


def test_missing_decoder_is_refused_before_loading_naming_the_flag(hf_folder, meta_vq):
    info = checkpoint.inspect(hf_folder)
    with pytest.raises(checkpoint.MissingVQDecoderError, match=r"no VQ decoder .*pass --vq PATH \(Meta's tokenizer/vqgan\.ckpt"):
        info.require_vq_decoder()
    assert checkpoint.MissingVQDecoderError.exit_code == 2
    with_vq = checkpoint.inspect(hf_folder, vq=meta_vq)
    with_vq.require_vq_decoder()
    assert with_vq.has_vq_decoder and with_vq.vq_source == meta_vq
    with pytest.raises(FileNotFoundError, match=r"--vq: VQ-GAN checkpoint not found: .*nothere\.ckpt"):
        checkpoint.inspect(hf_folder, vq=meta_vq.parent / "nothere.ckpt")
    lone = meta_vq.parent.parent / "lone" / "vqgan.ckpt"  # a checkpoint without its YAML beside it
    lone.parent.mkdir(exist_ok=True)
    lone.write_bytes(meta_vq.read_bytes())
    with pytest.raises(FileNotFoundError, match=r"--vq: VQ-GAN config not found: .*lone/vqgan\.yaml"):
        checkpoint.inspect(hf_folder, vq=lone)


def test_vq_flag_attaches_metas_decoder(hf_folder, meta_vq):
    bundle = checkpoint.load(hf_folder, vq=meta_vq)
    hf = _hf_model(hf_folder)
    assert bundle.vq.has_decoder and bundle.info.has_vq_decoder
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ref = hf.model.vqmodel.encode(pixels, return_dict=True).image_tokens.view(2, -1)
    codes = bundle.vq.encode(pixels)
    assert torch.equal(codes, ref)  # the attached tokenizer is the model's own
    image = bundle.vq.decode(codes)
    assert image.shape == (2, 3, 32, 32) and torch.isfinite(image).all()
    # Meta's checkpoint had loss.* tensors: dropped, and the decoder equals the file's
    sd = torch.load(meta_vq, weights_only=True)["state_dict"]
    assert torch.equal(bundle.vq.state_dict()["decoder.conv_out.weight"], sd["decoder.conv_out.weight"])


def test_a_vq_from_another_tokenizer_is_refused(hf_folder, meta_vq, tmp_path):
    import shutil

    sd = torch.load(meta_vq, weights_only=True)
    sd["state_dict"]["quantize.embedding.weight"] = torch.randn_like(sd["state_dict"]["quantize.embedding.weight"])
    torch.save(sd, tmp_path / "vqgan.ckpt")
    shutil.copy(meta_vq.with_suffix(".yaml"), tmp_path / "vqgan.yaml")
    with pytest.raises(checkpoint.CheckpointError, match="codebook differs from the checkpoint's own VQ tokenizer"):
        checkpoint.load(hf_folder, vq=tmp_path)  # a folder holding vqgan.ckpt + vqgan.yaml


def test_hf_folder_carrying_the_decoder_works_as_it_is(hf_folder, meta_vq, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "with-decoder"
    shutil.copytree(hf_folder, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    shard = load_file(str(folder / last))
    dec = {f"model.vqmodel.{k}": v for k, v in torch.load(meta_vq, weights_only=True)["state_dict"].items()
           if k.startswith("decoder.")}
    save_file({**shard, **dec}, str(folder / last), metadata={"format": "pt"})
    index["weight_map"].update({k: last for k in dec})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert checkpoint.inspect(folder).has_vq_decoder
    bundle = checkpoint.load(folder)
    ref = checkpoint.load(hf_folder, vq=meta_vq)
    codes = torch.randint(0, N_CODES, (1, 64), generator=torch.Generator().manual_seed(2))
    assert torch.equal(bundle.vq.decode(codes), ref.vq.decode(codes))


def test_metas_original_release_loads_with_the_same_weights(hf_folder, meta_release, meta_vq):
    info = checkpoint.inspect(meta_release)
    assert (info.layout, info.family, info.has_vq_decoder) == ("meta", "chameleon", True)
    meta = checkpoint.load(meta_release)
    hf = checkpoint.load(hf_folder, vq=meta_vq)
    assert meta.config.image_token_ids == hf.config.image_token_ids and meta.config.bos_id == 0
    assert meta.config.d_ff == hf.config.d_ff and meta.image_resolution == 32
    tokens, valid = _mixed_batch(hf.config)
    with torch.no_grad():
        assert torch.equal(meta.model(tokens, valid), hf.model(tokens, valid))
    codes = torch.randint(0, N_CODES, (1, 64), generator=torch.Generator().manual_seed(3))
    assert torch.equal(meta.vq.decode(codes), hf.vq.decode(codes))
    # the model folder inside the release works too
    assert checkpoint.inspect(meta_release / "models" / "7b").layout == "meta"


def test_convert_writes_a_native_folder_that_decodes(hf_folder, meta_vq, tmp_path):
    from typer.testing import CliRunner
    import typer

    from evals.cli.convert import convert

    app = typer.Typer()
    app.command()(convert)
    out = tmp_path / "native"
    res = CliRunner().invoke(app, [str(hf_folder), "--out", str(out), "--vq", str(meta_vq), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["vq_decoder"] and summary["family"] == "chameleon" and summary["layout"] == "hf"
    native = checkpoint.load(out)
    src = checkpoint.load(hf_folder, vq=meta_vq)
    assert checkpoint.inspect(out).layout == "native" and native.family == "chameleon"
    tokens, valid = _mixed_batch(src.config)
    with torch.no_grad():
        assert torch.equal(native.model(tokens, valid), src.model(tokens, valid))
    codes = torch.randint(0, N_CODES, (1, 64), generator=torch.Generator().manual_seed(4))
    assert torch.equal(native.vq.decode(codes), src.vq.decode(codes))
    res = CliRunner().invoke(app, [str(hf_folder), "--out", str(out)])
    assert res.exit_code != 0 and "not an empty folder" in str(res.exception or res.output)


# ----------------------------------------------------------------------------- checks before allocation
def _edit_hf_config(src: Path, dst: Path, **changes) -> Path:
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("field,value,msg", [
    ("vocab_size", 1e12, r"vocab_size=1000000000000"), ("num_hidden_layers", 1_000_000, r"n_layers=1000000 is outside"),
    ("hidden_size", 1 << 40, r"d_model=\d+ is outside"), ("intermediate_size", "big", r"d_ff='big' is not an integer")])
def test_absurd_config_sizes_are_one_line_errors_before_allocation(hf_folder, tmp_path, field, value, msg):
    import resource

    folder = _edit_hf_config(hf_folder, tmp_path / "bad", **{field: value})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for fn in (checkpoint.inspect, checkpoint.load):
        with pytest.raises(checkpoint.CheckpointError, match=msg) as e:
            fn(folder)
        assert "\n" not in str(e.value) and isinstance(e.value, Cm3evalError)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing big was allocated


def test_config_disagreeing_with_the_weights_shapes_names_the_shard(hf_folder, tmp_path):
    folder = _edit_hf_config(hf_folder, tmp_path / "wide", intermediate_size=512)
    with pytest.raises(checkpoint.CheckpointError, match=r"model-0000\d-of-00005\.safetensors: tensor layers\.0\.feed_forward\.w\d"
                                                         r"\.weight has shape \(\d+, \d+\), the config expects \(\d+, \d+\)"):
        checkpoint.load(folder)


def test_integer_and_nonfinite_weights_are_refused(native_bundle, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = checkpoint.save(native_bundle, tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    good = dict(state)
    state["norm.weight"] = torch.ones_like(state["norm.weight"], dtype=torch.int64)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(checkpoint.CheckpointError, match=r"tensor norm\.weight is I64; decoder weights must be floating point"):
        checkpoint.load(folder)
    bad = dict(good)
    bad["norm.weight"] = good["norm.weight"].clone()
    bad["norm.weight"][3] = float("nan")
    save_file(bad, str(folder / "model.safetensors"))
    with pytest.raises(checkpoint.CheckpointError, match=r"tensor norm\.weight holds NaN or Inf"):
        checkpoint.load(folder)


def test_public_api_is_importable_lazily():
    import subprocess
    import sys

    code = ("import sys, cm3leon; assert 'torch' not in sys.modules; b = cm3leon.load('demo'); "
            "assert isinstance(b.config, cm3leon.ModelConfig); print(sorted(cm3leon.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-1000:]
    for name in ("load", "save", "ModelConfig", "Sampler", "SamplingConfig", "GenerationRequest", "DocumentCodec"):
        assert name in out.stdout


def test_metas_model_parallel_shards_merge_to_the_same_model(hf_folder, meta_release, tmp_path):
    """Chameleon-30B's layout: consolidated.00/.01.pth, each holding half of every split tensor."""
    import shutil

    root = tmp_path / "mp"
    shutil.copytree(meta_release, root)
    model_dir = root / "models" / "7b"
    full = torch.load(model_dir / "consolidated.pth", weights_only=True)
    (model_dir / "consolidated.pth").unlink()
    split_dim = {"wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1}
    shards: list[dict[str, torch.Tensor]] = [{}, {}]
    for k, v in full.items():
        leaf = k.split(".")[-2]
        dim = 1 if k == "tok_embeddings.weight" else 0 if k == "output.weight" else split_dim.get(leaf)
        for i in range(2):
            shards[i][k] = v.chunk(2, dim=dim)[i].clone() if dim is not None else v.clone()
    for i, sd in enumerate(shards):
        torch.save(sd, model_dir / f"consolidated.{i:02d}.pth")
    merged = checkpoint.load(root)
    ref = checkpoint.load(meta_release)
    tokens, valid = _mixed_batch(ref.config)
    with torch.no_grad():
        assert torch.equal(merged.model(tokens, valid), ref.model(tokens, valid))
    assert len(checkpoint.inspect(root).files) == 2
