"""Tiny random checkpoints of Lumina-mGPT, Liquid and Emu3 in their REAL layouts (transformers is the
reference implementation of each decoder).

- Lumina-mGPT (Alpha-VLLM/Lumina-mGPT): a transformers Chameleon folder whose config.json names
  `ChameleonXLLMXForConditionalGeneration` and carries `z_loss_weight` (lumina_mgpt/model/
  configuration_xllmx_chameleon.py @ d897672a); Chameleon's vocabulary (65,536 ids,
  tests/chameleon_fixture.py), whose `<reserved08799>` (id 8803) ends each image row and
  `<reserved{8800+n}>` give the grid size (item_processor.py @ 250b9cf6: `tokens[0] - 8804`).
- Liquid (FoundationVision/Liquid, Junfeng5/Liquid_V1_7B): GemmaForCausalLM with Gemma's 256,000
  text ids and the 8,192 VQ codes appended (liquid/expand_vocabulary.py @ 4609c476: vocab_size +
  num_add_token); Gemma's specials at their ids (0 `<pad>`, 1 `<eos>`, 2 `<bos>`, 3 `<unk>`,
  4 `<mask>`, 5 `<2mass>`, 6 `[@BOS@]`, `<unused0..98>` = 7..105, 106 `<start_of_turn>`,
  107 `<end_of_turn>`), with `<unused0..2>` renamed `<boi>` `<eoi>` `<unconditional>` (TRAIN.md
  @ 4609c476; evaluation/VQA_Eval/model_vqa_loader.py uses boi 7, eoi 8). No lm_head (tied).
  Gemma's ids are from its tokenizer's user_defined_symbols order, not from Liquid's repository.
- Emu3 (transformers' convert_emu3_weights_to_hf.py @ 996a4017): hub key names `text_model.model.*`,
  `text_model.lm_head.weight`, `vqmodel.*`; config.json with text_config, vq_config and the whole
  vocabulary as `vocabulary_map`; the Qwen-style vocabulary: 151,643 text ids, then `<|endoftext|>`
  `<|im_start|>` `<|im_end|>` and `<|extra_0..204|>` from 151,643 (emu3/mllm/tokenization_emu3.py
  @ 005719f6: SPECIAL_START_ID), `<|extra_0|>` renamed `<image>` by the conversion; bos
  `<|extra_203|>` = 151849 and eos `<|extra_204|>` = 151850 as Emu3TextConfig says. NOT public in
  code: the order of emu3_vision_tokens.txt; this fixture puts `<|image start|>` `<|image end|>`
  `<|image token|>` at 151851..151853 and `<|visual token 000000..032767|>` from 151854, which fills
  Emu3TextConfig's vocab_size of 184,622 exactly.

Text ids are WordLevel words (enough to compare token sequences exactly); specials are added tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from chameleon_fixture import _save_shards, build_chameleon, chameleon_vocab

WORDS = ("a dog cat on the bench red blue sky What color is are there how many two . , : ? * 8 16 32 "
         "Generate an image of according to following prompt based this description user model You helpful "
         "assistant USER ASSISTANT 32x32 64x64 512x512 A photo Question Answer "
         # Emu3's positive and negative prompts (image_generation.py)
         "masterpiece film grained best quality lowres bad anatomy hands text error missing fingers extra digit "
         "fewer digits cropped worst low normal jpeg artifacts signature watermark username blurry").split()

# --- Liquid (Gemma)
GEMMA_TEXT = 256000
LIQUID_CODES = 8192
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<2mass>", "[@BOS@]"]
LIQUID_RENAMES = {"<unused0>": "<boi>", "<unused1>": "<eoi>", "<unused2>": "<unconditional>"}
LIQUID_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-6,
                      hidden_act="gelu")  # "gelu": the legacy value Gemma-7B's config.json holds

# --- Emu3
EMU3_SPECIAL_START = 151643
EMU3_VOCAB = 184622
EMU3_CODES = 32768
EMU3_VQ = dict(codebook_size=EMU3_CODES, embed_dim=4, latent_channels=4, base_channels=32,
               channel_multiplier=[1, 1, 2], num_res_blocks=1, attn_resolutions=[], temporal_downsample_factor=4,
               hidden_size=64, num_attention_heads=1)  # the middle block's width: 32 x 2
LUMINA_SIZE = 32  # the fixture VQ's resolution (tests/chameleon_fixture.py VQ_CONFIG)
EMU3_RESOLUTION = 32  # image_area 32*32: an 8 x 8 grid at the VQ's factor 4
EMU3_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5)


def _fill(names: list[str], size: int) -> list[str]:
    taken = set(names)
    return names + [f"w{i}" for i in range(size * 2) if f"w{i}" not in taken][: size - len(names)]


def write_word_tokenizer(vocab: dict[str, int], path: Path, specials: list[str], unk: str) -> None:
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in specials])
    tok.save(str(path))


def liquid_vocab() -> dict[str, int]:
    names = list(GEMMA_SPECIALS) + [LIQUID_RENAMES.get(f"<unused{i}>", f"<unused{i}>") for i in range(99)]
    names += ["<start_of_turn>", "<end_of_turn>"]
    assert names.index("<boi>") == 7 and names.index("<start_of_turn>") == 106
    names += WORDS
    names = _fill(names, GEMMA_TEXT)
    return {n: i for i, n in enumerate(names)}


def emu3_vocab() -> dict[str, int]:
    names = list(WORDS)
    names = _fill(names, EMU3_SPECIAL_START)
    names += ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"] + [f"<|extra_{i}|>" for i in range(1, 205)]
    names += ["<|image start|>", "<|image end|>", "<|image token|>"]
    names += [f"<|visual token {c:06d}|>" for c in range(EMU3_CODES)]
    vocab = {n: i for i, n in enumerate(names)}
    assert len(vocab) == EMU3_VOCAB and vocab["<|extra_203|>"] == 151849 and vocab["<|extra_204|>"] == 151850
    assert vocab["<|extra_200|>"] == 151846 and vocab["<image>"] == 151646
    return vocab


def lumina_vocab() -> dict[str, int]:
    """Chameleon's vocabulary (HF names) with fixture text words in place of filler pieces."""
    vocab = chameleon_vocab(hf=True)
    fillers = sorted((i for n, i in vocab.items() if n.startswith("w") and n[1:].isdigit()), reverse=True)
    by_id = {i: n for n, i in vocab.items()}
    for word in WORDS:
        if word not in vocab:
            by_id[fillers.pop()] = word
    return {n: i for i, n in by_id.items()}


def _perturb_norms(model: torch.nn.Module, skip: str = "vqmodel") -> None:
    """Non-trivial norm weights, so the (1 + w) and plain-w conventions are both tested."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and skip not in name:
                p.copy_(0.3 * torch.randn_like(p) + (0.0 if p.abs().sum() == 0 else 1.0))


@dataclass
class OpenFamilyFiles:
    lumina: Path
    liquid: Path
    emu3: Path


def build_lumina(root: Path, seed: int = 1) -> Path:
    """The folder is named as the hub names Lumina-mGPT (Alpha-VLLM/Lumina-mGPT-7B-768): its image size
    is in its name, not in config.json; the fixture's VQ makes 32 px images."""
    built = build_chameleon(root / "lumina-build", seed=seed).hf
    folder = built.rename(built.parent / f"Lumina-mGPT-7B-{LUMINA_SIZE}")
    cfg = json.loads((folder / "config.json").read_text())
    vocab = lumina_vocab()
    cfg.update(architectures=["ChameleonXLLMXForConditionalGeneration"], z_loss_weight=0.0, vocabulary_map=vocab)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    specials = [n for n in vocab if n.startswith("<") and n.endswith(">")]
    write_word_tokenizer(vocab, folder / "tokenizer.json", specials, unk="<unk>")
    return folder


def build_liquid(root: Path, seed: int = 2) -> Path:
    from transformers import GemmaConfig, GemmaForCausalLM

    vocab = liquid_vocab()
    cfg = GemmaConfig(vocab_size=GEMMA_TEXT + LIQUID_CODES, bos_token_id=2, eos_token_id=1, pad_token_id=0,
                      tie_word_embeddings=True, **LIQUID_DECODER)
    torch.manual_seed(seed)
    model = GemmaForCausalLM(cfg).eval()
    _perturb_norms(model)
    folder = root / "liquid"
    folder.mkdir(parents=True)
    cfg.architectures = ["GemmaForCausalLM"]
    cfg.save_pretrained(folder)
    state = {k: v.detach() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: not stored
    _save_shards(state, folder, 3)
    specials = [n for n in vocab if n.startswith("<") and n.endswith(">") or n == "[@BOS@]"]
    write_word_tokenizer(vocab, folder / "tokenizer.json", specials, unk="<unk>")
    return folder


def build_emu3(root: Path, seed: int = 3) -> Path:
    from transformers import Emu3Config, Emu3ForConditionalGeneration, Emu3TextConfig

    vocab = emu3_vocab()
    text = Emu3TextConfig(vocab_size=EMU3_VOCAB, bos_token_id=151849, eos_token_id=151850, pad_token_id=151643,
                          rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **EMU3_DECODER)
    cfg = Emu3Config(text_config=text, vq_config=dict(EMU3_VQ), vocabulary_map=vocab)
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(cfg).eval()
    _perturb_norms(model)
    folder = root / "emu3"
    folder.mkdir(parents=True)
    cfg.architectures = ["Emu3ForConditionalGeneration"]
    cfg.save_pretrained(folder)
    meta = json.loads((folder / "config.json").read_text())
    meta["image_area"] = EMU3_RESOLUTION ** 2  # BAAI/Emu3-Gen's config key (image_generation.py reads it)
    (folder / "config.json").write_text(json.dumps(meta))
    # the hub layout (convert_emu3_weights_to_hf.py's KEYS_TO_MODIFY_MAPPING), not transformers-5's in-memory names
    hub = {}
    for k, v in model.state_dict().items():
        k = ("text_model.model." + k[len("model.text_model."):] if k.startswith("model.text_model.") else
             "vqmodel." + k[len("model.vqmodel."):] if k.startswith("model.vqmodel.") else
             "text_model.lm_head.weight" if k == "lm_head.weight" else k)
        hub[k] = v.detach()
    _save_shards_emu3(hub, folder)
    specials = [n for n in vocab if n.startswith("<|") or n == "<image>"]
    write_word_tokenizer(vocab, folder / "tokenizer.json", specials, unk="<|endoftext|>")
    return folder


def _save_shards_emu3(state: dict[str, torch.Tensor], folder: Path) -> None:
    """Three shards: the embeddings, the layers and the VQ, then the head (model.safetensors.index.json)."""
    from safetensors.torch import save_file

    first = [k for k in state if "embed_tokens" in k]
    last = [k for k in state if k.startswith("text_model.lm_head") or k == "text_model.model.norm.weight"]
    middle = [k for k in state if k not in first and k not in last]
    weight_map = {}
    for i, names in enumerate((first, middle, last), 1):
        fname = f"model-{i:05d}-of-00003.safetensors"
        save_file({k: state[k].contiguous() for k in names}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in names})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))


_BUILT: dict[tuple[Path, str], Path] = {}


def open_family_folder(tmp_path_factory, name: str) -> Path:
    """The session's fixture folder of one family, built on first use."""
    key = (tmp_path_factory.getbasetemp(), name)
    if key not in _BUILT:
        build = {"lumina-mgpt": build_lumina, "liquid": build_liquid, "emu3": build_emu3}[name]
        _BUILT[key] = build(tmp_path_factory.mktemp(name))
    return _BUILT[key]
