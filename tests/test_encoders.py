"""`evals.encoders`: the one resolver of encoder names for retrieval, reranking and the CLIP metrics."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from cm3leon.checkpoint import ALIASES
from cm3leon.errors import Cm3evalError
from evals import encoders as E
from fixtures import HistogramEncoder


def test_model_is_the_bundles_encoder():
    enc = HistogramEncoder()
    assert E.resolve_encoder("model", model_bundle=SimpleNamespace(encoder=enc, path=None)) is enc


@pytest.mark.parametrize("bundle, why", [(None, "no model was given"),
                                         (SimpleNamespace(encoder=None, path=None), "has no dual encoder")])
def test_model_without_an_encoder_names_the_flag(bundle, why):
    with pytest.raises(E.EncoderUnavailable) as e:
        E.resolve_encoder("model", model_bundle=bundle, flag="--set generation.scorer=...")
    msg = str(e.value)
    assert why in msg and "--set generation.scorer=..." in msg and "open_clip:ARCH:PATH" in msg
    assert "\n" not in msg and isinstance(e.value, Cm3evalError) and e.value.exit_code == 2


def test_demo_reuses_the_demo_bundles_encoder_else_loads_the_zoo_one():
    own = HistogramEncoder()
    assert E.resolve_encoder("demo", model_bundle=SimpleNamespace(encoder=own, path=ALIASES["demo"])) is own
    other = SimpleNamespace(encoder=own, path=Path("/elsewhere"))
    if not (Path(ALIASES["demo"]) / E.DEMO_ENCODER_FILE).is_file():
        pytest.skip("the demo encoder is not built in this checkout")
    loaded = E.resolve_encoder("demo", model_bundle=other)
    assert loaded is not own and loaded.encode_text(["a red circle"]).shape[0] == 1


def test_unknown_kinds_and_missing_files_are_one_line_errors(tmp_path):
    with pytest.raises(E.EncoderUnavailable, match="native:PATH"):
        E.resolve_encoder("clip-vit-b32")  # no such kind (and no such folder)
    with pytest.raises(E.EncoderUnavailable, match="no encoder named; set metrics.x.encoder"):
        E.resolve_encoder(None, flag="metrics.x.encoder")
    with pytest.raises(E.EncoderUnavailable) as e:
        E.resolve_encoder(f"native:{tmp_path / 'missing.safetensors'}")
    assert "missing.safetensors" in str(e.value)


def test_a_bare_hf_clip_folder_is_hf_clip(tmp_path):
    (tmp_path / "clip").mkdir()
    assert E.canonical_spec(str(tmp_path / "clip")) == f"hf-clip:{tmp_path / 'clip'}"
    assert E.canonical_spec("open_clip:ViT-B-32:/w.pt") == "open_clip:ViT-B-32:/w.pt"
    (tmp_path / "clip" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (path, what), = E.required_encoder_files(str(tmp_path / "clip"))
    assert path == tmp_path / "clip" / "config.json" and "CLIP" in what


def test_required_encoder_files():
    assert E.required_encoder_files("model") == [] and E.required_encoder_files(None) == []
    assert E.required_encoder_files("open_clip:ViT-B-32:/w/c.safetensors")[0][0] == Path("/w/c.safetensors")
    assert E.required_encoder_files("native:/n.safetensors")[0][0] == Path("/n.safetensors")
    assert E.required_encoder_files("demo")[0][0] == Path(ALIASES["demo"]) / E.DEMO_ENCODER_FILE
    with pytest.raises(E.EncoderUnavailable, match="not a known kind"):
        E.required_encoder_files("open_clip:ViT-B-32")  # no path


def test_cache_resolves_each_name_once(monkeypatch):
    calls = []

    def fake(name, *, model_bundle=None, device="cpu", flag=""):
        calls.append(name)
        return object()

    monkeypatch.setattr(E, "resolve_encoder", fake)
    cache = E.EncoderCache(device="cpu")
    a = cache.get("native:/x")
    assert cache.get("native:/x") is a and calls == ["native:/x"]
    mine = HistogramEncoder()
    cache.put("--encoder", mine)
    assert cache.get("--encoder") is mine and calls == ["native:/x"]


# ----------------------------------------------------------------------------- the named default: clip-vit-b-32
@pytest.fixture(scope="module")
def saved_clip(tmp_path_factory) -> Path:
    """A random open_clip ViT-B-32 saved as safetensors, as tests/real_fixtures.py saves it."""
    from real_fixtures import save_open_clip

    return save_open_clip(tmp_path_factory.mktemp("clip") / "open_clip_model.safetensors")


@pytest.fixture
def no_clip_env(tmp_path, monkeypatch) -> Path:
    """An empty cache and no $CM3EVAL_CLIP_WEIGHTS; returns the cache file the default looks for."""
    monkeypatch.delenv("CM3EVAL_CLIP_WEIGHTS", raising=False)
    monkeypatch.setenv("CM3EVAL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "weights" / "open_clip_vit_b32.safetensors"


def test_clip_vit_b_32_missing_is_one_line_naming_both_places_the_variable_and_how_to_get_it(no_clip_env, tmp_path,
                                                                                             monkeypatch):
    with pytest.raises(E.EncoderUnavailable) as e:
        E.resolve_encoder("clip-vit-b-32", flag="--set generation.scorer=...")
    msg = str(e.value)
    assert "\n" not in msg and e.value.exit_code == 2
    for needed in (str(no_clip_env), "$CM3EVAL_CLIP_WEIGHTS", "open_clip:ViT-B-32:PATH", "laion2b_s34b_b79k",
                   "safetensors", "--set generation.scorer=..."):
        assert needed in msg, (needed, msg)
    (path, what), = E.required_encoder_files("clip-vit-b-32", "generation.scorer")
    assert path == no_clip_env and not path.exists()
    assert "CM3EVAL_CLIP_WEIGHTS" in what and "--set generation.scorer=open_clip:ViT-B-32:PATH" in what
    # a variable naming an absent file: both places are named
    monkeypatch.setenv("CM3EVAL_CLIP_WEIGHTS", str(tmp_path / "nowhere.safetensors"))
    with pytest.raises(E.EncoderUnavailable) as e:
        E.resolve_encoder("clip-vit-b-32")
    assert str(tmp_path / "nowhere.safetensors") in str(e.value) and str(no_clip_env) in str(e.value)


def test_clip_vit_b_32_is_found_through_the_variable_then_the_cache(no_clip_env, saved_clip, monkeypatch):
    monkeypatch.setenv("CM3EVAL_CLIP_WEIGHTS", str(saved_clip))
    assert E.canonical_spec("clip-vit-b-32") == f"open_clip:ViT-B-32:{saved_clip}"
    (path, what), = E.required_encoder_files("clip-vit-b-32")
    assert path == saved_clip and "clip-vit-b-32" in what
    named = E.resolve_encoder("clip-vit-b-32")
    direct = E.resolve_encoder(f"open_clip:ViT-B-32:{saved_clip}")
    assert named.fingerprint() == direct.fingerprint() and named.name == "open_clip:ViT-B-32"
    # no variable: the cache file (a link to the same weights)
    monkeypatch.delenv("CM3EVAL_CLIP_WEIGHTS")
    no_clip_env.parent.mkdir(parents=True)
    no_clip_env.symlink_to(saved_clip)
    assert E.required_encoder_files("clip-vit-b-32")[0][0] == no_clip_env
    assert E.canonical_spec("clip-vit-b-32") == f"open_clip:ViT-B-32:{no_clip_env}"
    cache = E.EncoderCache()
    assert cache.get("clip-vit-b-32").fingerprint() == direct.fingerprint()


def test_a_backend_that_is_not_installed_is_known_before_loading(monkeypatch):
    import importlib.util

    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "open_clip" else real_find(name, *a))
    with pytest.raises(E.EncoderUnavailable, match="needs the open_clip package, which is not installed"):
        E.required_encoder_files("open_clip:ViT-B-32:/w/c.safetensors")
