"""report.html: content per sample kind, escaping, self-containment, and a real browser render."""

from __future__ import annotations

import base64
import hashlib
import html as html_lib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import typer
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from reports import cli as reports_cli
from reports.html import render_run_report, script_json, write_run_report
from reports.errors import ReportError

EVIL = "<script>alert(1)</script>"
QUOTED_NAME = "we\"ird 'name' <x>.png"
CHROMIUM = "/usr/bin/chromium"


def _png(path: Path, color: tuple[int, int, int], size: int = 64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (size, size), (240, 240, 240))
    d = ImageDraw.Draw(im)
    d.ellipse((size // 8, size // 8, size * 7 // 8, size * 7 // 8), fill=color)
    im.save(path)


def _write_task(run: Path, task: str, samples: list[dict], *, spec_name: str | None = None,
                overrides: dict | None = None, rank_files: int = 1) -> None:
    (run / task / "samples").mkdir(parents=True, exist_ok=True)
    cfg = {"task": {"name": spec_name or task, "generation": {"cfg_scale": 1.0}},
           "model": "zoo/demo", "overrides": overrides or {}, "hash": f"h-{task}"}
    (run / task / "config.json").write_text(json.dumps(cfg))
    for r in range(rank_files):
        part = samples[r::rank_files]
        (run / task / "samples" / f"rank-{r:05d}.jsonl").write_text("".join(json.dumps(s) + "\n" for s in part))


def make_report_run(tmp: Path) -> Path:
    """A run with one task of each kind, a failure, a hostile caption and odd file names."""
    run = tmp / "run-a"
    colors = [(200, 40, 40), (40, 160, 60), (40, 60, 200), (220, 180, 30)]

    t2i = []
    for i in range(3):
        cands = []
        for c in range(3):
            rel = f"images/{i}-{c}.png"
            _png(run / "t2i-cfg1" / rel, colors[(i + c) % 4])
            cands.append(rel)
        t2i.append({"id": f"t2i-{i}", "index": i, "seed": 7 + i, "kind": "t2i", "prompt": f"a red circle {i}",
                    "prediction": None, "references": [], "images": {}, "candidates": cands,
                    "scores": [0.1, 0.9, 0.3], "best": 1, "failure": None, "retrieved": [{"text": "a circle"}],
                    "per_sample": {}})
    _write_task(run, "t2i-cfg1", t2i, spec_name="demo-t2i", overrides={"generation.cfg_scale": 1.0})
    _png(run / "t2i-cfg3" / "images" / "0-0.png", colors[0])
    _write_task(run, "t2i-cfg3", [dict(t2i[0], candidates=["images/0-0.png"], scores=[0.5], best=0)],
                spec_name="demo-t2i", overrides={"generation.cfg_scale": 3.0})

    _png(run / "caption" / "images" / QUOTED_NAME, colors[1])
    _png(run / "caption" / "images" / "big.png", colors[2], size=1024)
    caption = [
        {"id": "cap-0", "index": 0, "seed": 1, "kind": "caption", "prompt": "", "prediction": EVIL,
         "references": ["a green circle", "a circle on grey"], "images": {"image": f"images/{QUOTED_NAME}"},
         "failure": None, "per_sample": {"CIDEr": 0.2}},
        {"id": "cap-1", "index": 1, "seed": 2, "kind": "caption", "prompt": "", "prediction": "a blue circle",
         "references": ["a blue circle"], "images": {"image": "images/big.png"}, "failure": None,
         "per_sample": {"CIDEr": 2.5}},
        {"id": "cap-2", "index": 2, "seed": 3, "kind": "caption", "prompt": "", "prediction": "a circle",
         "references": ["a circle"], "images": {"image": "../../../../etc/passwd", "other": "images/nope.png"},
         "failure": None, "per_sample": {"CIDEr": 1.0}},
        {"id": "cap-3", "index": 3, "seed": 4, "kind": "caption", "prompt": "", "prediction": None,
         "references": ["x"], "images": {}, "failure": "NonFiniteLogitsError: NaN in logits", "per_sample": {}},
    ]
    _write_task(run, "caption", caption, rank_files=2)

    _png(run / "vqa" / "images" / "q.png", colors[3])
    answers = ["yellow"] * 7 + ["orange"] * 3
    vqa = [
        {"id": "q-0", "index": 0, "seed": 1, "kind": "vqa", "prompt": "what color is the circle?",
         "prediction": "yellow", "references": answers, "images": {"image": "images/q.png"},
         "failure": None, "per_sample": {"accuracy": 1.0}},
        {"id": "q-1", "index": 1, "seed": 2, "kind": "vqa", "prompt": "what shape?", "prediction": "square",
         "references": ["circle"] * 10, "images": {"image": "images/q.png"}, "failure": None,
         "per_sample": {"accuracy": 0.0}},
    ]
    _write_task(run, "vqa", vqa)

    for role, c in (("source", 0), ("generated", 1), ("target", 2)):
        _png(run / "edit" / "images" / f"{role}.png", colors[c])
    edit = [{"id": "e-0", "index": 0, "seed": 1, "kind": "edit", "prompt": "make the circle green",
             "prediction": None, "references": [], "failure": None, "per_sample": {"L1": 0.12},
             "images": {"target": "images/target.png", "source": "images/source.png",
                        "generated": "images/generated.png"}}]
    _write_task(run, "edit", edit)

    metrics = {
        "run": {"created": "2024-01-01T00:00:00", "versions": {"cm3eval": "0.1.0"}, "git_hash": "abc123",
                "model": "zoo/demo", "model_fingerprint": "fp-1", "argv": ["cm3eval", "run", "demo", "</script><!--"]},
        "tasks": {
            "t2i-cfg1": {"metrics": {"FD-demo": {"value": 30.0, "ci": [28.0, 32.0], "n": 3, "higher_is_better": False}},
                         "failures": [], "config_hash": "h1", "n_samples": 3},
            "t2i-cfg3": {"metrics": {"FD-demo": {"value": 22.0, "ci": [20.5, 23.0], "n": 1, "higher_is_better": False}},
                         "failures": [], "config_hash": "h3", "n_samples": 1},
            "caption": {"metrics": {"CIDEr": {"value": 1.2333, "ci": [0.4, 2.0], "n": 3, "higher_is_better": True},
                                     "BLEU-4": {"value": 0.31, "ci": None, "n": 3, "higher_is_better": True}},
                        "failures": [{"id": "cap-3", "error": "NonFiniteLogitsError: NaN in logits"}],
                        "config_hash": "hc", "n_samples": 4},
            "vqa": {"metrics": {"accuracy": {"value": 50.0, "ci": [0.0, 100.0], "n": 2, "higher_is_better": True}},
                    "failures": [], "config_hash": "hv", "n_samples": 2},
            "edit": {"metrics": {"L1": {"value": 0.12, "ci": None, "n": 1, "higher_is_better": False}},
                     "failures": [], "config_hash": "he", "n_samples": 1},
        },
    }
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_report_run(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def report_html(run_dir) -> str:
    return write_run_report(run_dir).read_text(encoding="utf-8")


def _data_uris(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_hostile_text_is_escaped(report_html):
    assert EVIL not in report_html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in report_html
    # The only script elements are the inert JSON data block and the page's own sort script
    # (allowed by its hash); hostile text never becomes one.
    assert re.findall(r"<script\b[^>]*>", report_html) == ['<script type="application/json" id="cm3eval-data">',
                                                           "<script>"]
    # The quoted file name appears only escaped (attribute-safe).
    assert QUOTED_NAME not in report_html
    assert "we&#34;ird &#39;name&#39; &lt;x&gt;.png" in report_html


def test_embedded_json_cannot_close_its_script(report_html, run_dir):
    blob = report_html.split('<script type="application/json" id="cm3eval-data">', 1)[1].split("</script>", 1)[0]
    assert "</" not in blob and "<!--" not in blob
    assert json.loads(blob) == json.loads((run_dir / "metrics.json").read_text())
    assert json.loads(script_json({"a": "</script><!-- &"})) == {"a": "</script><!-- &"}


def test_self_contained(report_html):
    assert "<link" not in report_html and "url(" not in report_html
    srcs = re.findall(r'\bsrc="([^"]*)"', report_html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r'href="(?!#)', report_html)  # only in-page links


def test_images_embedded_and_capped(report_html):
    sizes = [Image.open(io.BytesIO(b)).size for b in _data_uris(report_html)]
    # 3x3 t2i candidates + 1, caption 2 (the traversal and missing ones are not), vqa 2, edit 3,
    # plus the best/worst cards of caption and vqa (1 + 1 each)
    assert len(sizes) == 9 + 1 + 2 + 2 + 3 + 4
    assert max(max(s) for s in sizes) == 256  # the 1024 px image was downscaled to the cap
    assert min(min(s) for s in sizes) >= 128  # 64 px demo images enlarged to be visible
    assert "missing image: ../../../../etc/passwd" in report_html
    assert "missing image: images/nope.png" in report_html


def test_sample_galleries_by_kind(report_html):
    assert report_html.count('<figure class="winner">') == 3  # one per multi-candidate t2i sample
    assert "#1 · score 0.9 ★ chosen" in report_html and "#2 · score 0.3</figcaption>" in report_html
    assert "a red circle 0" in report_html
    assert '<span class="ok">correct (100%)</span>' in report_html
    assert '<span class="bad">incorrect (0%)</span>' in report_html
    assert '<li class="match">yellow ✓</li>' in report_html
    assert "make the circle green" in report_html
    edit = report_html.split("make the circle green", 1)[1]
    assert edit.index("source</figcaption>") < edit.index("generated</figcaption>") < edit.index("target</figcaption>")


def test_failures_best_worst_and_plot(report_html):
    assert "Failures (1)" in report_html and "NonFiniteLogitsError: NaN in logits" in report_html
    assert "Best samples by CIDEr" in report_html and "Worst samples by CIDEr" in report_html
    best = report_html.split("Best samples by CIDEr", 1)[1]
    assert best.index("cap-1") < best.index("Worst samples")  # highest CIDEr first
    # t2i-cfg1 / t2i-cfg3 share the spec demo-t2i and differ only in cfg_scale: a sweep plot
    assert "<svg" in report_html and "demo-t2i: FD-demo vs generation.cfg_scale" in report_html


def test_sample_cap(run_dir):
    html = render_run_report(run_dir, max_samples=1, n_extremes=0)
    assert "Samples (showing 1 of 4)" in html
    assert "Best samples" not in html


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(ReportError, match=r"metrics\.json: file not found"):
        render_run_report(tmp_path)
    (tmp_path / "metrics.json").write_text("{oops")
    with pytest.raises(ReportError, match=r"metrics\.json: malformed JSON at line 1"):
        render_run_report(tmp_path)
    (tmp_path / "metrics.json").write_text(json.dumps({"tasks": {"t": {"metrics": {}}}}))
    samples = tmp_path / "t" / "samples" / "rank-00000.jsonl"
    samples.parent.mkdir(parents=True)
    samples.write_text('{"id": "a", "index": 0}\n{"id": "b", "ind')  # cut-off last write: skipped
    assert "Samples (showing 1 of 1)" in render_run_report(tmp_path)
    samples.write_text('{"id": "a", "index": 0}\nnot json\n{"id": "c"}\n')
    with pytest.raises(ReportError, match=r"rank-00000\.jsonl:2: malformed sample line"):
        render_run_report(tmp_path)


def test_cli_report(run_dir, tmp_path):
    run_dir = Path(shutil.copytree(run_dir, tmp_path / "copy"))  # keep the shared report.html intact
    app = typer.Typer()
    app.command("report")(reports_cli.report)
    app.command("compare")(reports_cli.compare)  # two commands, so typer keeps subcommand names
    res = CliRunner().invoke(app, ["report", str(run_dir), "--max-samples", "2"])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == str(run_dir / "report.html")
    assert "Samples (showing 2 of 4)" in (run_dir / "report.html").read_text()
    res = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "not a run folder" in res.output


def test_per_task_tabs_and_a_strict_csp(report_html):
    assert report_html.count('class="tab-radio"') == 5  # one tab per task
    for task in ("t2i-cfg1", "t2i-cfg3", "caption", "vqa", "edit"):
        assert f">Task: {task}</h2>" in report_html
    meta = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', report_html)
    policy = html_lib.unescape(meta.group(1))
    assert "unsafe-inline" not in policy and "default-src 'none'" in policy and "img-src data:" in policy
    script = report_html.split("<script>", 1)[1].split("</script>", 1)[0]
    style = report_html.split("<style>", 1)[1].split("</style>", 1)[0]
    for kind, text in (("script-src", script), ("style-src", style)):
        digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
        assert f"{kind} 'sha256-{digest}'" in policy, kind
    assert ' style="' not in report_html  # inline style attributes would be blocked by the policy


def test_one_scale_per_metric_family(report_html):
    """CIDEr x100 beside BLEU 0-1 was wrong: the captioning family shares one scale, named."""
    assert "captioning: pycocoevalcap scores x100 (the papers&#39; scale)" in report_html
    table = report_html.split('<h2 id="metrics">', 1)[1].split("</table>", 1)[0]
    assert '<td>CIDEr</td><td class="num">123.3</td>' in table
    assert '<td>BLEU-4</td><td class="num">31</td>' in table
    assert "vqa: VQA accuracy in % (0-100)" in table and '<td class="num">50</td>' in table
    # the "better" column is what metrics.json records, never a guess from the name
    assert '<td>edit</td><td>L1</td><td class="num">0.12</td><td></td><td class="num">1</td><td>lower</td>' in table
    assert '<td>vqa</td><td>accuracy</td><td class="num">50</td><td>[0, 100]</td><td class="num">2</td>' \
           '<td>higher</td>' in table
    # per-sample scores on the same scale as the table (cap-1's CIDEr 2.5 -> 250)
    assert "CIDEr 250" in report_html and "accuracy 100" in report_html


def test_edit_grid_source_edit_target(report_html):
    card = report_html.split("make the circle green", 1)[1].split("</article>", 1)[0]
    # input → output | target, on one row
    assert card.count('<span class="arrow">→</span>') == 1 and card.count('<span class="bar"') == 1
    assert card.index("source</figcaption>") < card.index('class="arrow"') < card.index("generated</figcaption>") \
        < card.index('class="bar"') < card.index("target</figcaption>")
    assert '<figure class="reference"><img' in card  # the target is the ground truth


def _one_task_run(tmp: Path, task: str, samples: list[dict], entry: dict) -> Path:
    run = tmp / "one"
    _write_task(run, task, samples)
    (run / "metrics.json").write_text(json.dumps({"run": {"model": "zoo/demo"}, "tasks": {task: entry}}))
    return run


def test_t2i_grid_shows_reference_then_candidates_and_codes_only_candidates(tmp_path):
    run = tmp_path / "one"
    _png(run / "t2i" / "images" / "ref.png", (10, 10, 200))
    _png(run / "t2i" / "images" / "gen.png", (200, 10, 10))
    for c in range(2):
        _png(run / "t2i" / "images" / f"c{c}.png", (10, 200, 10))
    with_pngs = {"id": "p0", "index": 0, "seed": 0, "kind": "t2i", "prompt": "a dog", "failure": None,
                 "images": {"reference": "images/ref.png", "generated": "images/c1.png"},
                 "candidates": ["images/c0.png", "images/c1.png"], "scores": [0.2, 0.7], "best": 1, "per_sample": {}}
    codes_only = {"id": "p1", "index": 1, "seed": 1, "kind": "t2i", "prompt": "a cat", "failure": None,
                  "images": {"reference": "images/ref.png", "generated": "images/gen.png"},
                  "candidates": [{"codes": [1, 2, 3], "score": 0.1 * j} for j in range(8)], "best": 3,
                  "per_sample": {}}
    entry = {"metrics": {"FD-demo": {"value": 1.0, "ci": None, "n": 2, "higher_is_better": False}},
             "failures": [], "n_samples": 2}
    html = render_run_report(_one_task_run(tmp_path, "t2i", [with_pngs, codes_only], entry))
    first = html.split("a dog", 1)[1].split("</article>", 1)[0]
    assert first.index('<figure class="reference">') < first.index('<figure class="winner">')
    assert first.count("<figure") == 3 and "#1 · score 0.7 ★ chosen" in first and "#0 · score 0.2<" in first
    # 8 candidates kept as VQ codes: each listed with its score; the chosen one is the output image,
    # the others say they were not saved (never another image in their place)
    second = html.split("a cat", 1)[1].split("</article>", 1)[0]
    assert second.count("<figure") == 1 + 8 and second.count("<img") == 2  # the reference and the chosen one
    assert second.count("not saved (run with --save-candidates)") == 7
    assert "#3 · score 0.3 ★ chosen" in second and "#7 · score 0.7" in second
    assert "8 candidates generated, 1 shown as images" in second


def test_no_metrics_says_why(tmp_path):
    reason = "fid: not computed: FID needs the Inception weights: pt_inception-2015-12-05.pth not found"
    sample = {"id": "p0", "index": 0, "seed": 0, "kind": "t2i", "prompt": "x", "failure": None, "images": {},
              "candidates": [], "per_sample": {}}
    html = render_run_report(_one_task_run(tmp_path, "coco-fid", [sample],
                                           {"metrics": {}, "failures": [], "n_samples": 1, "notes": [reason]}))
    assert "No metrics." in html and html.count(reason.replace("not found", "")) >= 2  # summary and the task tab
    assert "coco-fid: no metrics: fid: not computed" in html
    # The engine's record of a requested metric that produced no number is shown as it is.
    entry = {"metrics": {"t2i_R@1": {"value": 40.0, "ci": None, "n": 1, "higher_is_better": True}},
             "failures": [], "n_samples": 1, "missing_metrics": {"fid": "FID needs the Inception weights"}}
    (tmp_path / "one" / "metrics.json").write_text(json.dumps({"run": {}, "tasks": {"coco-fid": entry}}))
    html = render_run_report(tmp_path / "one")
    assert "fid not computed: FID needs the Inception weights" in html
    entry["metrics"] = {}
    (tmp_path / "one" / "metrics.json").write_text(json.dumps({"run": {}, "tasks": {"coco-fid": entry}}))
    assert "No metrics: fid: FID needs the Inception weights" in render_run_report(tmp_path / "one")


def test_unrecorded_direction_is_shown_as_unknown_not_guessed(tmp_path):
    samples = [{"id": f"e{i}", "index": i, "seed": i, "kind": "edit", "prompt": "p", "failure": None, "images": {},
                "per_sample": {"L2 (MSE)": 0.1 * i}} for i in range(4)]
    entry = {"metrics": {"L2 (MSE)": {"value": 0.15, "ci": None, "n": 4}}, "failures": [], "n_samples": 4}
    html = render_run_report(_one_task_run(tmp_path, "edit", samples, entry))
    assert "<td>unknown</td>" in html and "Best samples" not in html
    assert "does not record whether higher L2 (MSE) is better" in html


def test_html_comes_from_templates():
    """No HTML in f-strings and no hand escaping in the Python of the report."""
    src = Path(__file__).parent.parent / "reports"
    for name in ("html.py", "samples.py", "images.py", "svg.py", "publish.py"):
        text = (src / name).read_text()
        tag = r"""f["'][^"'\n]*<(div|td|tr|table|figure|img|span|li|svg|text|circle|h\d|p)\b"""
        assert not re.search(tag, text), name
        assert "esc(" not in text and "from html import" not in text, name


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(),
                    reason=f"headless Chromium not found at {CHROMIUM}")
def test_report_renders_in_chromium(run_dir, report_html):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) not installed")
    events: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: events.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: events.append(f"pageerror: {e}"))
            page.on("dialog", lambda d: (events.append(f"dialog: {d.message}"), d.dismiss()))
            page.goto((run_dir / "report.html").resolve().as_uri(), wait_until="load")
            assert page.locator("h1").first.is_visible()
            imgs = page.evaluate("[...document.images].map(i => [i.complete, i.naturalWidth])")
            assert len(imgs) == 21 and all(c and w > 0 for c, w in imgs), imgs
            page.click("label[for=tab-2]")  # the caption task's tab
            assert page.locator("#panel-2").is_visible() and not page.locator("#panel-0").is_visible()
            assert EVIL in page.inner_text("#panel-2")  # shown as text
            tools = page.locator('.sample-tools[data-grid="grid-2"]')
            tools.locator(".sort-by").select_option("CIDEr")
            tools.locator(".sort-order").select_option("desc")
            order = "[...document.querySelectorAll('#grid-2 .sample')].filter(c => !c.hidden).map(c => c.dataset.index)"
            assert page.evaluate(order) == ["1", "2", "0", "3"]  # CIDEr 250, 100, 20, then the failed one
            tools.locator(".sort-order").select_option("asc")
            assert page.evaluate(order) == ["0", "2", "1", "3"]
            tools.locator(".min-score").fill("50")
            assert page.evaluate(order) == ["2", "1"] and tools.locator(".shown-count").inner_text() == "2 of 4 shown"
            tools.locator(".min-score").fill("")
            tools.locator(".failed-only").check()
            assert page.evaluate(order) == ["3"]
            assert page.evaluate("[...document.scripts].map(s => s.type)") == ["application/json", ""]
            assert page.locator("svg.chart").count() >= 1
            page.screenshot(path="/tmp/report.png", full_page=True)
        finally:
            browser.close()
    assert events == []
