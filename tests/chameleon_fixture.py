"""Tiny random Chameleon checkpoints in the REAL layouts (transformers is the reference implementation).

- `hf_folder`: what transformers' conversion produces for Chameleon / Anole: config.json
  (model_type "chameleon", vocabulary_map, vq_config, bos_token_id 1 as the converted configs say),
  5 safetensors shards + model.safetensors.index.json, tokenizer.json; `model.vqmodel.*` holds the
  VQ encoder only (the conversion drops the decoder).
- `meta_vq`: Meta's tokenizer/vqgan.ckpt (Lightning `state_dict`, taming names, `loss.*` tensors)
  + tokenizer/vqgan.yaml, whose encoder is the one inside `hf_folder`.
- `meta_release`: Meta's original release layout: models/7b/{params.json, consolidated.pth},
  tokenizer/{text_tokenizer.json, vqgan.ckpt, vqgan.yaml}; the same weights as `hf_folder`.

The vocabulary has Chameleon's real layout and size (65,536 ids): 0 <s>, 1 <pad>, 2 </s>, 3 <unk>;
4..8195 the 8192 IMGIMG<A-J digits>Z codes (ids in name order); 8196 <eoss>; 8197 <racm3:break>;
<reservedNNNNN> = NNNNN + 4 from 8198 (so <reserved08706> = 8710), HF's <image> = 8711 in place of
<reserved08707>; text words fill the rest.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from cm3leon.text import chameleon_image_token

VOCAB_SIZE = 65536
N_CODES = 8192
FIRST_RESERVED, LAST_RESERVED = 8198, 8999  # ids of <reserved08194> .. <reserved08995>
N_TEXT = VOCAB_SIZE - LAST_RESERVED - 1  # the last N_TEXT ids are text words
N_SHARDS = 5
EOT_ID, HF_IMAGE_ID = 8710, 8711
WORDS = ("a the of on in with and is are two red blue green man woman dog cat sitting standing next to "
         "table street picture photo people what color how many there").split()
VQ_CONFIG = dict(embed_dim=8, num_embeddings=N_CODES, latent_channels=8, resolution=32, in_channels=3, out_channels=3,
                 base_channels=32, channel_multiplier=[1, 1, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0)
DECODER = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=1024, rms_norm_eps=1e-5)


def chameleon_vocab(hf: bool = True) -> dict[str, int]:
    """Chameleon's vocabulary layout at full size; `hf`: with transformers' <image> rename of <reserved08707>."""
    names = ["<s>", "<pad>", "</s>", "<unk>"]
    names += sorted(chameleon_image_token(c) for c in range(N_CODES))  # ids follow name order, as in the release
    names += ["<eoss>", "<racm3:break>"]
    names += [f"<reserved{i - 4:05d}>" for i in range(FIRST_RESERVED, LAST_RESERVED + 1)]
    if hf:
        names[HF_IMAGE_ID] = "<image>"
    names += list(WORDS) + [f"w{i}" for i in range(N_TEXT - len(WORDS))]
    assert len(names) == VOCAB_SIZE and names[EOT_ID] == "<reserved08706>"
    return {n: i for i, n in enumerate(names)}


def write_tokenizer(vocab: dict[str, int], path: Path) -> None:
    """A word-level tokenizers file; every <...> name is an added special token, as in Chameleon's."""
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = sorted((i, n) for n, i in vocab.items() if n.startswith("<") and n.endswith(">"))
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for _, n in specials])
    tok.save(str(path))


def _save_shards(state: dict[str, torch.Tensor], out: Path, n_shards: int) -> None:
    """HF's sharded layout: model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    from safetensors.torch import save_file

    # as real checkpoints are cut: embeddings first, the head last, the layers (then the VQ) between
    total = sum(t.numel() * t.element_size() for t in state.values())
    first = [k for k in state if "embed_tokens" in k]
    last = [k for k in state if k.startswith(("lm_head", "model.norm"))]
    middle = [k for k in state if k not in first and k not in last]
    groups: dict[str, list[str]] = {}
    for k in middle:  # one group per layer, one for the VQ
        groups.setdefault(".".join(k.split(".")[:3]) if ".layers." in k else "vq", []).append(k)
    parts = list(groups.values())
    n_mid = n_shards - 2
    assert len(parts) >= n_mid, "too few layer groups for the shard count"
    per = -(-len(parts) // n_mid)
    mids = [[k for g in parts[i:i + per] for k in g] for i in range(0, len(parts), per)]
    shards = [first] + mids + [last]
    assert len(shards) == n_shards and all(shards), [len(x) for x in shards]
    weight_map = {}
    for i, names in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: state[k].contiguous() for k in names}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def taming_yaml(cfg: dict) -> dict:
    return {"model": {"target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": cfg["embed_dim"], "n_embed": cfg["num_embeddings"],
        "ddconfig": {"double_z": False, "z_channels": cfg["latent_channels"], "resolution": cfg["resolution"],
                     "in_channels": cfg["in_channels"], "out_ch": cfg["out_channels"], "ch": cfg["base_channels"],
                     "ch_mult": list(cfg["channel_multiplier"]), "num_res_blocks": cfg["num_res_blocks"],
                     "attn_resolutions": list(cfg["attn_resolutions"]), "dropout": cfg["dropout"]},
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                       "params": {"disc_start": 0, "codebook_weight": 1.0}}}}}


@dataclass
class ChameleonFiles:
    hf: Path  # the HF-layout folder
    vq_dir: Path  # holds vqgan.ckpt + vqgan.yaml


def build_chameleon(root: Path, seed: int = 0) -> ChameleonFiles:
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    from cm3leon import vq as vq_lib

    vocab = chameleon_vocab(hf=True)
    cfg = ChameleonConfig(vocab_size=VOCAB_SIZE, vocabulary_map=vocab, vq_config=dict(VQ_CONFIG),
                          bos_token_id=1, eos_token_id=2, pad_token_id=1, **DECODER)  # bos 1: as converted configs say
    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(cfg).eval()
    heads, kv, hd = DECODER["num_attention_heads"], DECODER["num_key_value_heads"], DECODER["hidden_size"] // 4
    with torch.no_grad():  # non-trivial norms, so their layout is tested; qk-norms shared by heads, as converted
        for name, p in model.named_parameters():
            if "norm" not in name or "vqmodel" in name:
                continue
            if "q_norm" in name or "k_norm" in name:
                row = torch.randn(hd) * 0.3 + (1.0 if name.endswith("weight") else 0.0)
                p.copy_(row.expand(heads if "q_norm" in name else kv, hd))
            else:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    hf = root / "chameleon-hf"
    hf.mkdir(parents=True)
    cfg.save_pretrained(hf)
    _save_shards({k: v.detach() for k, v in model.state_dict().items()}, hf, N_SHARDS)
    write_tokenizer(vocab, hf / "tokenizer.json")
    # Meta's vqgan.ckpt: the HF encoder's weights, a random decoder, and the GAN loss's tensors
    vq = vq_lib.VQModel(vq_lib.VQConfig(**VQ_CONFIG))
    enc = {k[len("model.vqmodel."):]: v for k, v in model.state_dict().items() if k.startswith("model.vqmodel.")}
    missing, unexpected = vq.load_state_dict(enc, strict=False)
    assert not unexpected and all(k.startswith("decoder.") for k in missing), (missing, unexpected)
    vq_dir = root / "tokenizer"
    vq_dir.mkdir()
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    state["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    state["loss.logvar"] = torch.zeros(())
    torch.save({"state_dict": state, "global_step": 0}, vq_dir / "vqgan.ckpt")
    (vq_dir / "vqgan.yaml").write_text(yaml.safe_dump(taming_yaml(VQ_CONFIG)))
    return ChameleonFiles(hf, vq_dir)


def build_meta_release(files: ChameleonFiles, out: Path) -> Path:
    """Meta's original layout with the weights of `files.hf` (Meta's names; qk-norm one [head_dim] row)."""
    from cm3leon import checkpoint

    bundle = checkpoint.load(files.hf)
    state = {}
    for k, v in bundle.model.state_dict().items():
        if "_normalization." in k:
            assert torch.equal(v, v[:1].expand_as(v)), k  # shared by heads in a converted checkpoint
            v = v[0]
        state[k] = v.clone()
    model_dir = out / "models" / "7b"
    model_dir.mkdir(parents=True)
    torch.save(state, model_dir / "consolidated.pth")
    params = {"model": {"dim": DECODER["hidden_size"], "n_layers": DECODER["num_hidden_layers"],
                        "n_heads": DECODER["num_attention_heads"], "n_kv_heads": DECODER["num_key_value_heads"],
                        "norm_eps": DECODER["rms_norm_eps"], "rope_theta": 10000.0, "swin_norm": False,
                        "multiple_of": 256, "ffn_dim_multiplier": 1.0, "vocab_size": VOCAB_SIZE},
              "model_parallel_size": 1}
    (model_dir / "params.json").write_text(json.dumps(params))
    (out / "tokenizer").mkdir()
    write_tokenizer(chameleon_vocab(hf=False), out / "tokenizer" / "text_tokenizer.json")
    for name in ("vqgan.ckpt", "vqgan.yaml"):
        shutil.copy(files.vq_dir / name, out / "tokenizer" / name)
    return out


_BUILT: dict[Path, ChameleonFiles] = {}  # one build per test session (keyed by its temp root)


def chameleon_files_for(tmp_path_factory) -> ChameleonFiles:
    """The session's fixture files, built on first use; every fixture below needs only tmp_path_factory,
    so a test module imports just the fixtures it uses."""
    base = tmp_path_factory.getbasetemp()
    if base not in _BUILT:
        _BUILT[base] = build_chameleon(tmp_path_factory.mktemp("chameleon"))
    return _BUILT[base]


@pytest.fixture(scope="module")
def chameleon_files(tmp_path_factory) -> ChameleonFiles:
    return chameleon_files_for(tmp_path_factory)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    return chameleon_files_for(tmp_path_factory).hf


@pytest.fixture(scope="module")
def meta_vq(tmp_path_factory) -> Path:
    """Meta's vqgan.ckpt (vqgan.yaml beside it)."""
    return chameleon_files_for(tmp_path_factory).vq_dir / "vqgan.ckpt"


@pytest.fixture(scope="module")
def meta_release(tmp_path_factory) -> Path:
    files = chameleon_files_for(tmp_path_factory)
    out = files.hf.parent / "meta-release"
    return out if out.is_dir() else build_meta_release(files, out)


def hf_model(folder: Path):
    from transformers import ChameleonForConditionalGeneration

    return ChameleonForConditionalGeneration.from_pretrained(folder).eval()
