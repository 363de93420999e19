"""Task specs and the registry: validation messages name the file and field, --set overrides are
typed, unknown keys get close matches, every shipped spec loads, the paper suite has the paper's
settings, the sampler's settings are validated by the sampler's own validate(), YAML alias bombs
are refused, and `cm3eval list/show` print the registry."""

from __future__ import annotations

import dataclasses
import json
import textwrap

import pytest
import yaml
from typer.testing import CliRunner

import tasks
from cm3leon.errors import Cm3evalError
from cm3leon.sampling_config import SamplingConfig
from evals import plan
from evals.cli import app
from tasks.spec import GenerationSpec, SpecError, apply_overrides, load_spec, parse_assignments

GOOD = textwrap.dedent("""\
    name: mini-vqa
    kind: vqa
    dataset:
      loader: vqav2
      split: val2014
      files: {questions: q.json, annotations: a.json}
      images: val2014
    prompt:
      template: "Question: {question} Answer:"
    generation:
      greedy: true
      max_new_tokens: 5
      top_p: 0.9
    metrics:
      vqa_accuracy: {}
    """)


def write(tmp_path, text, name="spec.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def err(tmp_path, text) -> str:
    p = write(tmp_path, text)
    with pytest.raises(SpecError) as e:
        plan.check_spec(load_spec(p), str(p))  # the registry's checks + the metric table (evals)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(p) + ": ")
    return msg[len(str(p)) + 2:]


# ----------------------------------------------------------------------------- the registry
def test_every_shipped_spec_loads_and_suites_resolve():
    names = tasks.list()
    for expected in ("coco-fid", "coco-caption", "vqav2", "okvqa", "vizwiz", "textvqa", "magicbrush-edit",
                     "shapes-fid", "shapes-caption", "shapes-vqa", "shapes-edit"):
        assert expected in names
    for n in names:
        spec = tasks.get(n)
        assert spec.name == n and spec.metrics
        plan.check_spec(spec, n)  # metric names and options: checked above the task layer
    assert tasks.suites()["demo"] == ["shapes-fid", "shapes-caption", "shapes-vqa", "shapes-edit", "shapes-dialog",
                                      "shapes-paragraph", "shapes-text-render", "shapes-canny2image"]
    assert tasks.suites()["paper"] == ["coco-fid", "coco-caption", "vqav2", "vizwiz", "okvqa"]
    assert tasks.expand(["demo", "shapes-vqa", "vqav2"]) == ["shapes-fid", "shapes-caption", "shapes-vqa",
                                                            "shapes-edit", "shapes-dialog", "shapes-paragraph",
                                                            "shapes-text-render", "shapes-canny2image", "vqav2"]
    with pytest.raises(SpecError, match="did you mean vqav2"):
        tasks.get("vqa2")


def test_a_suite_gives_its_members_settings_and_set_wins(tmp_path, monkeypatch):
    from tasks import registry

    assert tasks.suites()["ci"] == ["coco-fid", "coco-caption", "vqav2"]
    fid, cap, vqa = plan.resolve_specs(["ci"], {})
    assert (fid.limit, fid.dataset.shuffle, fid.generation.n_candidates, fid.generation.rerank) == (1000, True, 1, False)
    assert (cap.limit, vqa.limit) == (1000, 2000) and cap.dataset.shuffle and vqa.dataset.shuffle
    assert [s.limit for s in plan.resolve_specs(["ci"], {"limit": "7"})] == [7, 7, 7]  # --set wins
    assert plan.resolve_specs(["coco-fid"], {})[0].generation.n_candidates == 8  # alone: its own spec
    bad = tmp_path / "suites.yaml"
    bad.write_text("x:\n  - no-such-task: {limit: 3}\n")
    monkeypatch.setattr(registry, "SUITES_FILE", bad)
    with pytest.raises(SpecError, match="x: unknown task 'no-such-task'"):
        tasks.suites()


def test_coco_fid_has_the_paper_settings():
    s = tasks.get("coco-fid")
    assert s.kind == "t2i" and s.limit == 30000 and s.dataset.split == "val2014"
    assert s.generation.n_candidates == 8 and s.generation.rerank
    assert s.retrieval.enabled and s.retrieval.k == 2
    assert s.metrics["fid"]["protocol"] == "pytorch-fid" and s.metrics["fid"]["resolution"] == 256
    assert s.dataset.shuffle and s.dataset.one_per_image  # 30K distinct random images
    edit = tasks.get("magicbrush-edit").generation
    assert (edit.cfg_scale, edit.image_cfg_scale) == (7.5, 1.5)  # the paper's SFT editing guidance
    # the demo's distance is never called FID
    assert tasks.get("shapes-fid").metrics["fid"]["feature_space"] == "demo"


# ----------------------------------------------------------------------------- validation messages
def test_valid_spec_round_trips_through_yaml(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    again = load_spec(write(tmp_path, spec.to_yaml(), "again.yaml"))
    assert again == spec and spec.generation.top_p == 0.9 and spec.generation.cfg_scale == 1.0


def test_error_names_file_and_field(tmp_path):
    assert err(tmp_path, GOOD.replace("top_p: 0.9", "top_p: high")) == \
        "generation.top_p: expected a number in (0, 1], got 'high'"
    assert err(tmp_path, GOOD.replace("top_p: 0.9", "top_p: 1.5")) == \
        "generation.top_p: expected a number in (0, 1], got 1.5"
    assert err(tmp_path, GOOD.replace("max_new_tokens: 5", "max_new_tokens: 2.5")) == \
        "generation.max_new_tokens: expected an integer >= 1, got 2.5"
    assert err(tmp_path, GOOD.replace("greedy: true", "greedy: 1")) == \
        "generation.greedy: expected true or false, got 1"
    assert err(tmp_path, GOOD.replace("kind: vqa", "kind: vqa2")).startswith("kind: expected one of t2i, caption")
    assert "generation.topp: unknown field (did you mean generation.top_p" in \
        err(tmp_path, GOOD.replace("top_p: 0.9", "topp: 0.9"))
    assert err(tmp_path, GOOD.replace("kind: vqa\n", "")) == "kind: required field is missing"
    assert "unknown placeholder {caption}" in err(tmp_path, GOOD.replace("{question}", "{caption}"))
    assert "inside the data root" in err(tmp_path, GOOD.replace("q.json", "../../etc/q.json"))
    assert "inside the data root" in err(tmp_path, GOOD.replace("q.json", "/etc/q.json"))
    assert "metrics.bleu: unknown metric" in err(tmp_path, GOOD.replace("vqa_accuracy: {}", "bleu: {}"))
    assert "metrics.fid: applies to t2i/control tasks, not vqa" in err(tmp_path, GOOD.replace("vqa_accuracy: {}", "fid: {}"))
    assert "dataset.files.questions: required by loader vqav2" in err(tmp_path, GOOD.replace("questions: q.json, ", ""))
    assert "dataset.loader: unknown loader 'vqa3'" in err(tmp_path, GOOD.replace("loader: vqav2", "loader: vqa3"))


def test_malformed_yaml_names_file_and_line(tmp_path):
    p = write(tmp_path, GOOD.replace("  greedy: true", "  greedy: [true"))
    with pytest.raises(SpecError, match=rf"^{p}: malformed YAML at line \d+, column \d+"):
        load_spec(p)
    p = write(tmp_path, "- just\n- a list\n", "list.yaml")
    with pytest.raises(SpecError, match="expected a mapping at the top level"):
        load_spec(p)


# ----------------------------------------------------------------------------- overrides
def test_overrides_are_typed_by_field():
    s = tasks.get("vqav2")
    o = apply_overrides(s, parse_assignments([
        "generation.cfg_scale=3", "generation.top_k=40", "generation.greedy=false", "generation.top_p=null",
        "retrieval.enabled=yes", "limit=10", 'prompt.stop=[";", "\\n"]', "dataset.support.split=train",
        "prompt.k_shot=2"]))
    g = o.generation
    assert g.cfg_scale == 3.0 and isinstance(g.cfg_scale, float) and g.top_k == 40 and g.greedy is False
    assert g.top_p is None and o.retrieval.enabled is True and o.limit == 10 and o.prompt.stop == [";", "\n"]
    assert o.prompt.k_shot == 2 and o.dataset.support.split == "train"
    assert s.generation.cfg_scale == 1.0  # the registry's spec is untouched
    f = apply_overrides(tasks.get("coco-fid"), {"metrics.fid.resolution": "299", "metrics.fid.weights": "/w.pth"})
    assert f.metrics["fid"]["resolution"] == 299 and f.metrics["fid"]["weights"] == "/w.pth"


@pytest.mark.parametrize("item, expected", [
    ("generation.cfg_scal=2", "did you mean generation.cfg_scale"),
    ("cfg_scale=2", "did you mean generation.cfg_scale"),
    ("metrics.fid.resolutoin=2", "did you mean metrics.fid.resolution"),
    ("nonsense.key=1", "see `cm3eval show TASK`"),
])
def test_unknown_override_key_lists_close_matches(item, expected):
    with pytest.raises(SpecError) as e:
        apply_overrides(tasks.get("coco-fid"), parse_assignments([item]))
    assert expected in str(e.value) and str(e.value).startswith(f"--set {item.split('=')[0]}: unknown key")


def test_override_values_are_validated():
    with pytest.raises(SpecError, match=r"--set generation.top_k=many: expected an integer"):
        apply_overrides(tasks.get("vqav2"), {"generation.top_k": "many"})
    with pytest.raises(SpecError, match=r"generation.top_p: expected a number in \(0, 1\], got 2.0"):
        apply_overrides(tasks.get("vqav2"), {"generation.top_p": "2"})
    with pytest.raises(SpecError, match="expected key.path=value"):
        parse_assignments(["generation.top_p"])
    with pytest.raises(SpecError, match="cannot be overridden"):
        apply_overrides(tasks.get("vqav2"), {"kind": "t2i"})


# ----------------------------------------------------------------------------- CLI: list / show
def test_cli_list_and_show():
    runner = CliRunner()
    res = runner.invoke(app, ["list", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["tasks"]["coco-fid"]["kind"] == "t2i" and "paper" in data["suites"]

    res = runner.invoke(app, ["show", "coco-fid", "--set", "generation.top_p=0.5", "--cfg-scale", "2",
                              "--retrieval-k", "1", "--candidates", "4", "--cdk-alpha", "0.1", "--limit", "100"])
    assert res.exit_code == 0, res.output
    shown = yaml.safe_load(res.stdout)
    assert shown["generation"]["top_p"] == 0.5 and shown["generation"]["cfg_scale"] == 2.0
    assert shown["retrieval"]["k"] == 1 and shown["generation"]["n_candidates"] == 4
    assert shown["retrieval"]["enabled"] is True  # --retrieval-k N>0 switches retrieval on
    assert shown["generation"]["cdk_alpha"] == 0.1 and shown["limit"] == 100


def test_cli_retrieval_k_switches_retrieval():
    runner = CliRunner()
    shown = lambda *a: yaml.safe_load(runner.invoke(app, ["show", "shapes-fid", *a]).stdout)["retrieval"]  # noqa: E731
    assert shown()["enabled"] is False  # the demo spec runs without retrieval
    assert shown("--retrieval-k", "2") == {**shown(), "enabled": True, "k": 2}
    assert shown("--retrieval-k", "0")["enabled"] is False
    # an explicit --set wins over the shorthand's implied switch
    assert shown("--retrieval-k", "2", "--set", "retrieval.enabled=false")["enabled"] is False


def test_cli_show_errors_are_one_line():
    runner = CliRunner()
    res = runner.invoke(app, ["show", "coco-fid", "--set", "generation.cfg_scal=2"])
    assert res.exit_code == 2
    assert res.stderr.strip().count("\n") == 0 and "did you mean generation.cfg_scale" in res.stderr
    res = runner.invoke(app, ["show", "no-such-task"])
    assert res.exit_code == 2 and "unknown task or suite 'no-such-task'" in res.stderr


# ----------------------------------------------------------------------------- one validation of sampling
def test_generation_spec_is_the_samplers_config_without_copies():
    assert issubclass(GenerationSpec, SamplingConfig)
    own = {f.name for f in dataclasses.fields(GenerationSpec)} - {f.name for f in dataclasses.fields(SamplingConfig)}
    assert own == {"max_new_tokens", "rerank", "scorer"}  # the predictor's settings, nothing the sampler has
    assert "temperature" not in GenerationSpec.__dict__.get("__annotations__", {})  # inherited, not redeclared
    # every field of the sampler is settable from a spec with its own default
    assert {f.name: f.default for f in dataclasses.fields(SamplingConfig)} == \
        {f.name: f.default for f in dataclasses.fields(GenerationSpec) if f.name not in own}


def test_sampling_re_exports_the_torch_free_config():
    """One SamplingConfig: cm3leon/sampling_config.py (torch-free, so the spec layer and the plan
    answer usage errors without importing torch) is the class cm3leon/sampling.py uses."""
    from cm3leon import sampling

    assert sampling.SamplingConfig is SamplingConfig


def test_spec_accepts_only_what_the_sampler_accepts(tmp_path):
    # temperature 0 used to pass the spec and fail every sample in the sampler
    assert err(tmp_path, GOOD.replace("greedy: true", "temperature: 0")) == \
        "generation.temperature: expected a number > 0 (or greedy: true), got 0.0"
    assert load_spec(write(tmp_path, GOOD.replace("greedy: true", "greedy: true\n  temperature: 0"),
                           "g.yaml")).generation.temperature == 0.0  # greedy ignores the temperature
    assert "generation.mix_cdk_fraction" in err(tmp_path, GOOD.replace("greedy: true", "mix_cdk_fraction: 0.5"))
    for key, value in [("temperature", "0"), ("top_k", "0"), ("n_candidates", "0"), ("cdk_k", "0"),
                       ("mix_cdk_fraction", "2"), ("top_p", "0")]:
        with pytest.raises(SpecError) as e:
            apply_overrides(tasks.get("shapes-fid"), {f"generation.{key}": value})
        assert f"generation.{key}: expected" in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(ValueError):  # and the sampler refuses the same value
            SamplingConfig(**{key: type(getattr(SamplingConfig(), key) or 1.0)(float(value))}).validate()
    assert isinstance(SpecError("x"), Cm3evalError) and SpecError.exit_code == 2


def test_sampling_config_per_kind():
    edit = tasks.get("magicbrush-edit")
    assert edit.sampling_config().image_cfg_scale == 1.5  # 3-stream guidance: editing only
    t2i = apply_overrides(tasks.get("coco-fid"), {"generation.image_cfg_scale": "2"})
    assert t2i.sampling_config().image_cfg_scale is None and t2i.sampling_config().n_candidates == 8
    vqa = apply_overrides(tasks.get("vqav2"), {"generation.n_candidates": 8})  # a typed value, parsed once
    assert vqa.generation.n_candidates == 8 and vqa.sampling_config().n_candidates == 1  # one answer per question
    assert type(vqa.sampling_config()) is SamplingConfig


BOMB = textwrap.dedent("""\
    a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
    d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
    e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
    f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
    g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
    h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
    i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
    """)


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    # 9^9 = 387M strings: yaml.safe_load returns it (shared refs), and asdict / deepcopy / json then hang;
    # the refusal counts the nodes the aliases would expand to (the message says so) instead.
    bomb_option = GOOD.replace("vqa_accuracy: {}", "vqa_accuracy:\n    " + BOMB.replace("\n", "\n    ").rstrip())
    with pytest.raises(SpecError, match=r"refused: aliases expand to more than \d+ nodes"):
        load_spec(write(tmp_path, bomb_option))
    with pytest.raises(SpecError, match=r"^--set metrics.fid: refused: aliases expand"):
        inline = "{" + ", ".join(line.replace(": ", ": ", 1) for line in BOMB.splitlines()) + "}"
        apply_overrides(tasks.get("coco-fid"), {"metrics.fid": inline})
    with pytest.raises(SpecError, match="recursive alias"):
        load_spec(write(tmp_path, "name: &n [*n]\n", "rec.yaml"))
    # ordinary anchors stay usable
    ok = GOOD.replace("max_new_tokens: 5", "max_new_tokens: &five 5").replace("top_p: 0.9", "top_p: 0.9\n  cdk_k: *five")
    assert load_spec(write(tmp_path, ok, "ok.yaml")).generation.cdk_k == 5


def test_templates_may_name_special_roles(tmp_path):
    ok = GOOD.replace('"Question: {question} Answer:"', '"Question: {question}{eot} Answer:"')
    assert load_spec(write(tmp_path, ok, "roles.yaml")).prompt.template.endswith("{eot} Answer:")
    msg = err(tmp_path, GOOD.replace("{question}", "{question}{eos_token}"))
    assert "unknown placeholder {eos_token}" in msg and "{eot}" in msg


def test_the_protocol_fields_of_a_spec():
    """coco-fid names the published protocol it reproduces; the fields are validated like any other."""
    spec = tasks.get("coco-fid")
    assert spec.protocol.name == "coco-fid-30k" and spec.protocol.manifest_hash is None
    assert spec.dataset.manifest is None
    assert apply_overrides(spec, {"dataset.manifest": "/tmp/m.json"}).dataset.manifest == "/tmp/m.json"
    with pytest.raises(SpecError, match=r"protocol.name: expected a published protocol"):
        apply_overrides(spec, {"protocol.name": "coco-fid-10k"})
    with pytest.raises(SpecError, match=r"protocol.manifest_hash: expected a sha256 \(64 hex digits\)"):
        apply_overrides(spec, {"protocol.manifest_hash": "abc"})
    assert apply_overrides(spec, {"protocol.manifest_hash": "a" * 64}).protocol.manifest_hash == "a" * 64
    with pytest.raises(SpecError, match=r"dataset.manifest: a manifest pins a published protocol"):
        apply_overrides(tasks.get("coco-caption"), {"dataset.manifest": "/tmp/m.json"})
