"""Captioning metrics against pycocoevalcap itself (real COCO data), the nlg-eval published scores,
concurrency safety, process hygiene, SPICE availability and input errors."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from evals.metrics import captioning
from evals.metrics.captioning import (
    _corpus_bleu,
    bleu_counts,
    bleu_scorer,
    caption_metrics,
    ptb_tokenize,
    spice_status,
)

from real_data import COCO_CAPTIONS_VAL2017 as COCO_ANN, COCO_FAKECAP_RESULTS as COCO_RESULTS, NLG_EVAL as NLG
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(subprocess.run(["which", "java"], capture_output=True).returncode != 0,
                                reason="needs Java")


def _coco_case() -> tuple[dict, dict]:
    """The toolkit's fake results restricted to the 126 ids that are val2017 images, with their references."""
    refs = defaultdict(list)
    for a in json.loads(COCO_ANN.read_text())["annotations"]:
        refs[a["image_id"]].append(a["caption"])
    preds = {r["image_id"]: r["caption"] for r in json.loads(COCO_RESULTS.read_text()) if r["image_id"] in refs}
    return preds, {i: refs[i] for i in preds}


def _children() -> set[int]:
    """Live child processes of this process (Linux /proc)."""
    me, out = os.getpid(), set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) == me and fields[0] != "Z":
                out.add(int(d.name))
    return out


def _toolkit_files() -> set[tuple[str, int]]:
    root = captioning._toolkit_dir("")
    return {(str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*")
            if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def coco():
    preds, refs = _coco_case()
    assert len(preds) == 126
    before = _children()
    ours = caption_metrics(preds, refs)
    leaked = _children() - before
    return preds, refs, ours, leaked


@pytest.fixture(scope="module")
def upstream(coco):
    """pycocoevalcap called directly, as its COCOEvalCap does (same dict order)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    preds, refs, _, _ = coco
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in refs[i]] for i in preds})
    res = tok.tokenize({i: [{"caption": preds[i]}] for i in preds})
    out = {"gts": gts, "res": res}
    out["bleu"] = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()
    out["meteor"] = meteor.compute_score(gts, res)
    meteor.__del__()  # upstream only ends its java process on garbage collection
    del meteor
    gc.collect()
    out["rouge"] = Rouge().compute_score(gts, res)
    out["cider"] = Cider().compute_score(gts, res)
    return out


# ---------------------------------------------------------------------------- parity with pycocoevalcap


def test_ptb_tokens_identical_to_pycocoevalcap(coco, upstream):
    preds, refs, _, _ = coco
    assert ptb_tokenize({i: refs[i] for i in preds}) == upstream["gts"]
    assert ptb_tokenize({i: [preds[i]] for i in preds}) == upstream["res"]


def test_ptb_tricky_strings_identical_and_aligned():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    caps = {1: ['A man said "hello" (twice)...', "Don't  stop -- it's O.K.!"], 2: [""], 3: ["café, naïve; 2,000 € -- é"],
            4: ["?!"], 5: ["trailing space  "]}
    ours = ptb_tokenize(caps)
    assert ours == PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in caps.items()})
    # pycocoevalcap's quirk, kept: -lowerCase turns -LRB- into -lrb-, which its punctuation list misses.
    assert ours[1][0] == "a man said hello -lrb- twice -rrb-" and ours[2] == [""] and ours[4] == ["?!"]
    # Line breaks other than "\n" end a line for the Java tokenizer; they must not shift captions.
    assert ptb_tokenize({1: ["a\rb", "c\u2028d"], 2: ["e\x0bf"], 3: ["g"]}) == {1: ["a b", "c d"], 2: ["e f"], 3: ["g"]}


def test_scores_identical_to_pycocoevalcap(coco, upstream):
    _, _, ours, _ = coco
    bleu, bleu_per = upstream["bleu"]
    for k in range(4):
        assert ours[f"BLEU-{k + 1}"].value == bleu[k]
        assert np.array_equal(ours[f"BLEU-{k + 1}"].per_sample, np.asarray(bleu_per[k]))
    assert ours["METEOR"].value == upstream["meteor"][0]
    assert np.array_equal(ours["METEOR"].per_sample, np.asarray(upstream["meteor"][1]))
    assert ours["ROUGE-L"].value == upstream["rouge"][0]
    assert np.array_equal(ours["ROUGE-L"].per_sample, upstream["rouge"][1])
    assert ours["CIDEr"].value == upstream["cider"][0]
    assert np.array_equal(ours["CIDEr"].per_sample, upstream["cider"][1])
    # The numbers themselves (pycocoevalcap 1.2 on this data), so a silent change of either side shows.
    assert ours["BLEU-4"].value == pytest.approx(0.1982654397164889, abs=1e-12)
    assert ours["CIDEr"].value == pytest.approx(0.6277218728360188, abs=1e-12)


def test_meteor_pipelined_stats_equal_one_call_each(coco):
    """stats_many writes every SCORE line from a thread while reading answers: same answers, same order,
    and no deadlock when the answers overflow a pipe buffer (~80 kB here)."""
    preds, refs, _, _ = coco
    flat = lambda t: " ".join(t.split())  # noqa: E731  (raw COCO captions hold newlines; the tokenizer drops them)
    pairs = [(flat(preds[i]), [flat(r) for r in refs[i]]) for i in preds] * 8
    with captioning.MeteorJar() as jar:
        one_by_one = [jar.stats(h, r) for h, r in pairs[:126]]
        many = jar.stats_many(pairs)
    assert sum(len(a) + 1 for a in many) > 65536
    assert many[:126] == one_by_one and many[126:252] == one_by_one and many[-126:] == one_by_one


def test_prestarted_meteor_is_taken_once_and_killed_at_exit_when_unused():
    captioning.prestart_meteor()
    jar = captioning._take_meteor()
    assert jar.proc.poll() is None and captioning._prestarted is None
    with jar:
        assert jar.stats("a red circle", ["a red circle on a white background"])
    assert jar.proc.poll() is not None
    other = captioning._take_meteor()  # nothing prestarted: a fresh jar
    assert other is not jar
    other.close()
    captioning.prestart_meteor()
    unused = captioning._prestarted
    captioning._discard_prestarted()
    assert unused.proc.poll() is not None and captioning._prestarted is None


def test_result_shape_and_cis(coco):
    _, _, ours, leaked = coco
    assert not leaked, f"java processes left running: {leaked}"
    assert list(ours) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE"]
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
        r = ours[name]
        assert r.n == 126 and r.per_sample.shape == (126,)
        lo, hi = r.ci
        assert lo < r.value < hi, name
        assert hi - lo < 0.5 * max(r.value, 0.1), name  # a CI, not a range of everything
    assert ours["CIDEr"].extra["idf_over"] == 126 and ours["CIDEr"].extra["variant"] == "CIDEr-D"
    # CIDEr and ROUGE-L are means of their per-image scores; BLEU and METEOR are corpus-level, not means.
    assert ours["CIDEr"].value == pytest.approx(ours["CIDEr"].per_sample.mean(), abs=1e-12)
    assert ours["METEOR"].value != pytest.approx(ours["METEOR"].per_sample.mean(), abs=1e-4)


def test_spice_reported_unavailable_not_crashing(coco):
    available, reason = spice_status()
    spice = coco[2]["SPICE"]
    if available:
        assert np.isfinite(spice.value)
    else:
        assert np.isnan(spice.value) and spice.extra["available"] is False
        assert "stanford-corenlp-3.6.0" in spice.extra["reason"] and reason == spice.extra["reason"]


def test_spice_status_sees_installed_models(tmp_path, monkeypatch):
    (tmp_path / "spice" / "lib").mkdir(parents=True)
    monkeypatch.setattr(captioning, "_toolkit_dir", lambda sub: tmp_path / sub)
    assert spice_status()[0] is False
    for f in ("spice-1.0.jar", "lib/stanford-corenlp-3.6.0.jar", "lib/stanford-corenlp-3.6.0-models.jar"):
        (tmp_path / "spice" / f).write_bytes(b"")
    assert spice_status() == (True, "")


def test_bleu_counts_reproduce_corpus_bleu(upstream):
    gts, res = upstream["gts"], upstream["res"]
    scorer = bleu_scorer(gts, res, list(res))
    expected, _ = scorer.compute_score(option="closest", verbose=0)
    np.testing.assert_allclose(_corpus_bleu(bleu_counts(scorer).sum(axis=0)), expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------- nlg-eval published numbers


def test_nlg_eval_published_scores():
    hyp = (NLG / "hyp.txt").read_text().splitlines()
    r1 = (NLG / "ref1.txt").read_text().splitlines()
    r2 = (NLG / "ref2.txt").read_text().splitlines()
    preds = dict(enumerate(hyp))
    refs = {i: [r1[i], r2[i]] for i in range(len(hyp))}
    got = caption_metrics(preds, refs, tokenize="none", spice=False)
    published = {"BLEU-1": 0.550000, "BLEU-2": 0.428174, "BLEU-3": 0.284043, "BLEU-4": 0.201143,
                 "METEOR": 0.295797, "ROUGE-L": 0.522104, "CIDEr": 1.242192}
    assert set(got) == set(published)  # spice=False leaves SPICE out
    for name, value in published.items():
        assert got[name].value == pytest.approx(value, abs=1e-6), name


# ---------------------------------------------------------------------------- concurrency


_WORKER = """
import json, sys
from evals.metrics.captioning import caption_metrics
data = json.loads(open(sys.argv[1]).read())
preds = {int(k): v for k, v in data["preds"].items()}
refs = {int(k): v for k, v in data["refs"].items()}
out = caption_metrics(preds, refs, spice=False)
print(json.dumps({k: v.value for k, v in out.items()}))
"""


_PTB_WORKER = """
import json, sys
from evals.metrics.captioning import ptb_tokenize
caps = {int(k): v for k, v in json.loads(open(sys.argv[1]).read()).items()}
print(json.dumps([ptb_tokenize(caps) for _ in range(4)]))
"""


def test_two_processes_tokenize_at_once(tmp_path):
    # The hazard of pycocoevalcap's tokenizer (a shared temp folder) without METEOR's start-up cost.
    preds, refs = _coco_case()
    ids = list(preds)
    parts = [{i: refs[i] for i in ids[:63]}, {i: [preds[i]] + refs[i][:1] for i in ids[63:]}]
    files = []
    for n, part in enumerate(parts):
        files.append(tmp_path / f"caps{n}.json")
        files[-1].write_text(json.dumps(part))
    before = _toolkit_files()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", _PTB_WORKER, str(f)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, cwd=REPO, env=env) for f in files]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1].decode()[-500:] for o in outs]
    assert _toolkit_files() == before
    for part, (stdout, _) in zip(parts, outs):
        expected = {str(k): v for k, v in ptb_tokenize(part).items()}
        assert all(run == expected for run in json.loads(stdout))


@pytest.mark.slow
def test_two_processes_at_once_score_correctly_and_write_nothing_in_the_toolkit(tmp_path):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    preds, refs = _coco_case()
    ids = list(preds)
    halves = [ids[:63], ids[63:]]
    files = []
    for n, part in enumerate(halves):
        f = tmp_path / f"part{n}.json"
        f.write_text(json.dumps({"preds": {i: preds[i] for i in part}, "refs": {i: refs[i] for i in part}}))
        files.append(f)
    before = _toolkit_files()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(f)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              cwd=REPO, env=env) for f in files]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1].decode()[-500:] for o in outs]
    assert _toolkit_files() == before
    for part, (stdout, _) in zip(halves, outs):
        got = json.loads(stdout)
        # Expected: pycocoevalcap on the same half, tokenized in this process (no concurrency).
        gts = ptb_tokenize({i: refs[i] for i in part})
        res = ptb_tokenize({i: [preds[i]] for i in part})
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        assert [got[f"BLEU-{k + 1}"] for k in range(4)] == bleu
        assert got["ROUGE-L"] == Rouge().compute_score(gts, res)[0]
        assert got["CIDEr"] == Cider().compute_score(gts, res)[0]
        assert 0 < got["METEOR"] < 1


# ---------------------------------------------------------------------------- errors


def test_input_errors_name_the_ids():
    with pytest.raises(ValueError, match="no predictions"):
        caption_metrics({}, {1: ["a"]})
    with pytest.raises(ValueError, match=r"predicted ids have no references, e\.g\. \[7\]"):
        caption_metrics({1: "a", 7: "b"}, {1: ["a"]})
    with pytest.raises(ValueError, match=r"reference ids have no prediction, e\.g\. \[2\]"):
        caption_metrics({1: "a"}, {1: ["a"], 2: ["b"]})
    with pytest.raises(ValueError, match=r"empty \(or non-list\) reference list, e\.g\. \[1\]"):
        caption_metrics({1: "a"}, {1: []})
    with pytest.raises(ValueError, match=r"empty \(or non-list\) reference list, e\.g\. \[1\]"):
        caption_metrics({1: "a"}, {1: "a dog"})
    with pytest.raises(TypeError, match=r"must be strings; not so for ids \[1\]"):
        caption_metrics({1: None}, {1: ["a"]})
    with pytest.raises(ValueError, match="tokenize must be"):
        caption_metrics({1: "a"}, {1: ["a"]}, tokenize="spacy")


# ---------------------------------------------------------------------------- CLI


def _cli():
    from evals.cli.score import caption

    app = typer.Typer()
    app.command()(caption)
    return app


def test_cli_scores_only_result_images(tmp_path, monkeypatch):
    # METEOR is covered above; a stub keeps this plumbing test free of its ~10 s java start-up.
    from evals.metrics.result import MetricResult
    monkeypatch.setattr(captioning, "_meteor", lambda gts, res, ids, seed: MetricResult("METEOR", 0.25, (0.2, 0.3), len(ids)))
    preds, refs = _coco_case()
    some = list(preds)[:12]
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": i, "caption": preds[i]} for i in some]))
    out = CliRunner().invoke(_cli(), [str(tmp_path / "res.json"), "--annotations", str(COCO_ANN), "--json",
                                      "--tokenize", "none"])
    assert out.exit_code == 0, out.output
    got = json.loads(out.stdout)
    assert got["CIDEr"]["n"] == 12 and got["CIDEr"]["extra"]["idf_over"] == 12
    assert got["SPICE"]["value"] is None or np.isfinite(got["SPICE"]["value"])
    # Same numbers as the function on those 12 images (BLEU and CIDEr need no Java).
    gts = captioning.whitespace_tokenize({i: refs[i] for i in some})
    res = captioning.whitespace_tokenize({i: [preds[i]] for i in some})
    from pycocoevalcap.cider.cider import Cider
    assert got["CIDEr"]["value"] == Cider().compute_score(gts, res)[0]
    assert set(got["BLEU-1"]) >= {"value", "ci", "n"} and got["METEOR"]["value"] == 0.25


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "res.json").write_text(json.dumps([{"image_id": 1, "caption": "x"}]))
    out = CliRunner().invoke(_cli(), [str(tmp_path / "res.json"), "--annotations", str(COCO_ANN)])
    assert out.exit_code == 2 and out.output.strip().startswith("error:") and "not in" in out.output
    assert len(out.output.strip().splitlines()) == 1
    (tmp_path / "dup.json").write_text(json.dumps([{"image_id": 139, "caption": "x"}, {"image_id": 139, "caption": "y"}]))
    out = CliRunner().invoke(_cli(), [str(tmp_path / "dup.json"), "--annotations", str(COCO_ANN)])
    assert out.exit_code == 2 and "more than one caption" in out.output
