"""The one weights finder (tasks.weights): every network in one table, one search order, one-line errors."""

from __future__ import annotations

import pytest

from tasks.weights import NAMED_ENCODERS, WEIGHTS, WeightsNotFound


@pytest.fixture
def roots(tmp_path, monkeypatch):
    monkeypatch.setenv("CM3EVAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    for w in WEIGHTS.values():
        monkeypatch.delenv(w.env, raising=False)
    return tmp_path


@pytest.mark.parametrize("key", sorted(WEIGHTS))
def test_every_network_is_searched_in_the_same_order(roots, monkeypatch, key):
    w = WEIGHTS[key]
    cache = roots / "cache" / "weights" / w.filename
    hub = roots / "th" / "hub" / "checkpoints" / w.filename
    env = roots / "env" / w.filename
    assert [p for _, p in w.search_paths()] == [cache, hub]
    with pytest.raises(WeightsNotFound) as e:
        w.find()
    msg = str(e.value)
    assert "\n" not in msg and e.value.exit_code == 2
    for needed in (w.filename, str(cache), str(hub), w.env, w.option, w.url):
        assert needed in msg, (needed, msg)
    for path in (hub, cache, env):  # each later place wins only when the earlier ones are empty
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    assert w.find() == cache
    monkeypatch.setenv(w.env, str(env))
    assert [p for _, p in w.search_paths()] == [env, cache, hub] and w.find() == env
    # a named path is the only place looked at: a typo never falls back to another file
    with pytest.raises(WeightsNotFound, match="argument"):
        w.find(roots / "typo.pth")


def test_named_encoders_come_from_the_table():
    from evals.encoders import NAMED
    from tasks.spec import NAMED_ENCODERS as spec_names

    assert set(NAMED) == set(NAMED_ENCODERS) == set(spec_names) >= {"clip-vit-b-32", "clip-vit-l-14-336"}
    assert NAMED["clip-vit-l-14-336"].arch == "ViT-L-14-336"
