"""VQ-GAN tokenizer: parity with transformers' ChameleonVQVAE, taming/native loading, preprocessing."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from cm3leon.vq import (VQConfig, VQModel, hf_vq_state_dict, load_hf_vq, load_native, load_taming_checkpoint,
                        preprocess, save_native, to_pil)

# tiny, but with every block kind: two levels, attention at 16 px, a channel change (nin_shortcut)
TINY = dict(resolution=32, base_channels=32, channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[16],
            latent_channels=32, embed_dim=8, num_embeddings=64)


def _jitter(model: torch.nn.Module, seed: int = 0) -> None:
    """Move weights off their init so codes are spread over the codebook (a degenerate model proves nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _tiny(seed: int = 0, **over) -> VQModel:
    torch.manual_seed(seed)
    m = VQModel(VQConfig(**{**TINY, **over})).eval()
    _jitter(m, seed)
    return m


def _images(n: int = 3, res: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, res, res, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_codes_equal_transformers_chameleon_vqvae():
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

    hc = ChameleonVQVAEConfig(**TINY)
    torch.manual_seed(0)
    hf = ChameleonVQVAE(hc).eval()
    _jitter(hf)
    full = {f"model.vqmodel.{k}": v for k, v in hf.state_dict().items()}
    full["model.embed_tokens.weight"] = torch.zeros(4, 4)  # the LM's tensors are ignored
    ours = load_hf_vq(full, VQConfig.from_hf_dict(hc.to_dict()), source="hf-test")
    x = _images(4)
    with torch.no_grad():
        ref = hf.encode(x).image_tokens.view(4, -1)
    got = ours.encode(x)
    assert got.shape == (4, 16 * 16) and got.dtype == torch.long
    assert ref.unique().numel() > 8  # the comparison is not between two constant maps
    assert torch.equal(got, ref)
    assert not ours.has_decoder
    with pytest.raises(RuntimeError, match="no decoder.*vqgan.ckpt"):
        ours.decode(got)


def test_hf_state_dict_prefixes():
    sd = {"model.vqmodel.encoder.conv_in.weight": torch.zeros(1), "model.layers.0.w": torch.zeros(1)}
    assert list(hf_vq_state_dict(sd)) == ["encoder.conv_in.weight"]
    assert list(hf_vq_state_dict({"vqmodel.quant_conv.bias": torch.zeros(1)})) == ["quant_conv.bias"]
    with pytest.raises(ValueError, match="model.vqmodel"):
        hf_vq_state_dict({"model.layers.0.w": torch.zeros(1)})


def _taming_yaml(path: Path, cfg: VQConfig, **extra_dd) -> Path:
    dd = dict(double_z=False, z_channels=cfg.latent_channels, resolution=cfg.resolution, in_channels=3, out_ch=3,
              ch=cfg.base_channels, ch_mult=cfg.channel_multiplier, num_res_blocks=cfg.num_res_blocks,
              attn_resolutions=cfg.attn_resolutions, dropout=0.0, **extra_dd)
    doc = {"model": {"base_learning_rate": 4.5e-6, "target": "taming.models.vqgan.VQModel",
                     "params": {"embed_dim": cfg.embed_dim, "n_embed": cfg.num_embeddings, "ddconfig": dd,
                                "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                                               "params": {"disc_start": 0, "disc_weight": 0.75}}}}}
    path.write_text(yaml.safe_dump(doc))
    return path


def test_taming_lightning_checkpoint_round_trip(tmp_path):
    src = _tiny(3)
    cfg_path = _taming_yaml(tmp_path / "vqgan.yaml", src.config)
    assert VQConfig.from_taming_yaml(cfg_path) == src.config
    sd = dict(src.state_dict())
    sd["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)  # GAN loss tensors ride along in Lightning
    sd["loss.logvar"] = torch.zeros(())
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.0.8"},
               tmp_path / "vqgan.ckpt")
    loaded = load_taming_checkpoint(tmp_path / "vqgan.ckpt", cfg_path)
    for k, v in src.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = _images(2)
    assert torch.equal(loaded.encode(x), src.encode(x))
    assert torch.allclose(loaded.decode(loaded.encode(x)), src.decode(src.encode(x)))


class _NotWeights:
    pass


def test_pickle_with_objects_is_refused(tmp_path):
    src = _tiny()
    path = tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": src.state_dict(), "callbacks": _NotWeights()}, path)
    with pytest.raises(ValueError, match=r"vqgan\.ckpt.*refused to load") as e:
        load_taming_checkpoint(path, src.config)
    assert "\n" not in str(e.value)


def test_bad_checkpoints_name_file_and_tensor(tmp_path):
    src = _tiny()
    sd = dict(src.state_dict())
    sd["encoder.conv_in.weight"] = sd["encoder.conv_in.weight"][:16]
    torch.save({"state_dict": sd}, tmp_path / "shape.ckpt")
    with pytest.raises(ValueError, match=r"shape\.ckpt: tensor encoder\.conv_in\.weight has shape \(16, 3, 3, 3\)"):
        load_taming_checkpoint(tmp_path / "shape.ckpt", src.config)

    sd = dict(src.state_dict())
    del sd["quantize.embedding.weight"]
    torch.save({"state_dict": sd}, tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match=r"missing\.ckpt: missing tensor\(s\) quantize\.embedding\.weight"):
        load_taming_checkpoint(tmp_path / "missing.ckpt", src.config)

    sd = dict(src.state_dict())
    sd["decoder.conv_out.bias"] = torch.full_like(sd["decoder.conv_out.bias"], float("nan"))
    torch.save({"state_dict": sd}, tmp_path / "nan.ckpt")
    with pytest.raises(ValueError, match=r"nan\.ckpt: tensor decoder\.conv_out\.bias holds NaN"):
        load_taming_checkpoint(tmp_path / "nan.ckpt", src.config)

    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": src.state_dict()}, good)
    (tmp_path / "cut.ckpt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut\.ckpt: not a readable torch checkpoint"):
        load_taming_checkpoint(tmp_path / "cut.ckpt", src.config)

    with pytest.raises(FileNotFoundError, match=r"absent\.ckpt.*vqgan\.ckpt"):
        load_taming_checkpoint(tmp_path / "absent.ckpt", src.config)


def test_taming_yaml_rejects_unknown_options(tmp_path):
    cfg = VQConfig(**TINY)
    with pytest.raises(ValueError, match=r"odd\.yaml: unknown ddconfig key 'wobble'"):
        VQConfig.from_taming_yaml(_taming_yaml(tmp_path / "odd.yaml", cfg, wobble=1))
    with pytest.raises(ValueError, match=r"tanh\.yaml: ddconfig\.tanh_out"):
        VQConfig.from_taming_yaml(_taming_yaml(tmp_path / "tanh.yaml", cfg, tanh_out=True))


def test_native_safetensors_round_trip(tmp_path):
    src = _tiny(5)
    path = save_native(src, tmp_path)
    assert path.name == "vq.safetensors"
    loaded = load_native(tmp_path)
    assert loaded.config == src.config and loaded.has_decoder
    x = _images(2)
    assert torch.equal(loaded.encode(x), src.encode(x))

    enc_only = VQModel(src.config, with_decoder=False)
    enc_only.load_state_dict({k: v for k, v in src.state_dict().items() if not k.startswith("decoder.")})
    save_native(enc_only, tmp_path / "enc" / "vq.safetensors")
    assert not load_native(tmp_path / "enc").has_decoder

    blob = path.read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "vq.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match=r"cut/vq\.safetensors: not a readable safetensors"):
        load_native(tmp_path / "cut")
    with pytest.raises(FileNotFoundError, match=r"nowhere/vq\.safetensors.*save_native"):
        load_native(tmp_path / "nowhere")


def test_encode_decode_shapes_and_training_pass():
    m = _tiny(7)
    x = _images(2)
    codes = m.encode(x)
    assert codes.shape == (2, m.config.tokens_per_image) == (2, 256)
    assert int(codes.min()) >= 0 and int(codes.max()) < 64
    y = m.decode(codes)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    assert m.decode(codes[0]).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="codes must lie in"):
        m.decode(torch.full((1, 256), 64))
    with pytest.raises(ValueError, match="square"):
        m.decode(codes[:, :200])

    m.train()
    recon, qloss, train_codes = m(x)
    assert recon.shape == x.shape and qloss.ndim == 0 and torch.equal(train_codes, codes)
    (F.mse_loss(recon, x) + qloss).backward()
    # straight-through: the reconstruction loss reaches the encoder through the argmin
    assert m.encoder.conv_in.weight.grad.abs().sum() > 0
    assert m.quantize.embedding.weight.grad.abs().sum() > 0


def test_legacy_beta_placement():
    """taming legacy=True puts beta on the codebook term; legacy=False on the commitment term."""
    x = _images(1)
    grads = {}
    for legacy in (True, False):
        m = _tiny(9, legacy=legacy)
        _, qloss, _ = m.quantize(m._latents(x))
        qloss.backward()
        grads[legacy] = (m.quantize.embedding.weight.grad.clone(), m.quant_conv.weight.grad.clone())
    beta = 0.25
    assert torch.allclose(grads[True][0], beta * grads[False][0], rtol=1e-4, atol=1e-9)
    assert torch.allclose(beta * grads[True][1], grads[False][1], rtol=1e-4, atol=1e-9)


def test_preprocess_blends_alpha_on_white_and_center_crops():
    w, h = 40, 20
    rgba = np.zeros((h, w, 4), dtype=np.uint8)
    rgba[:, w // 2:] = (0, 0, 255, 255)  # right half opaque blue; left half transparent "black"
    x = preprocess([Image.fromarray(rgba, "RGBA")], 16)
    # short side 20 -> 16: 32x16, centre crop keeps columns 8..24 of 32, the seam in the middle
    assert x.shape == (1, 3, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x[0, :, 8, 2], torch.tensor([1.0, 1.0, 1.0]))
    assert torch.allclose(x[0, :, 8, 13], torch.tensor([-1.0, -1.0, 1.0]), atol=0.02)

    half = np.zeros((16, 16, 4), dtype=np.uint8)
    half[..., 3] = 128  # black at alpha 128 on white: (1 - 128/255) * 255 = 127, truncated as Chameleon
    x = preprocess(Image.fromarray(half, "RGBA"), 16)
    assert torch.allclose(x, torch.full_like(x, 127 / 255 * 2 - 1))

    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8), "RGB")
    back = to_pil(preprocess([rgb], 16))[0]
    assert back.tobytes() == rgb.tobytes()  # same size: no resize, and to_pil rounds exactly back


def test_config_validation():
    with pytest.raises(ValueError, match="divisible by 32"):
        VQConfig(base_channels=48)
    with pytest.raises(ValueError, match="double_latent"):
        VQConfig(double_latent=True)
    cfg = VQConfig()  # Chameleon's published VQ: 512 px, f=16, 1024 codes
    assert cfg.downsample_factor == 16 and cfg.tokens_per_image == 1024


def test_absurd_vq_configs_are_refused_before_allocation():
    from cm3leon.errors import Cm3evalError
    from cm3leon.vq import VQError

    for bad in (dict(base_channels=10**6), dict(num_embeddings=10**9), dict(resolution=10**7),
                dict(channel_multiplier=[1] * 40), dict(embed_dim=0)):
        with pytest.raises(VQError, match="sane range") as e:
            VQConfig(**bad)
        assert isinstance(e.value, Cm3evalError) and isinstance(e.value, ValueError) and "\n" not in str(e.value)
    with pytest.raises(VQError, match=r"vq_config: invalid VQConfig: base_channels=1000000"):
        VQConfig.from_hf_dict({"base_channels": 10**6}, source="vq_config")
