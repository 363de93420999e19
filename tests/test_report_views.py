"""What a researcher sees (issue 21), through the real engine, sample lines and report:
the text->image card shows the reference and every candidate with its rerank score (the chosen
one marked), the retrieved documents with text and thumbnail; edit cards read input → output |
target on one row; VQA cards the bare question; the deviations, the VQA breakdowns and every
command that built the run are on the page. Checked in headless Chromium (screenshot + DOM),
and the leaderboard page marks an n=2 VQA row as off-protocol.

The predictor here is injected (no model: fast); it returns what evals/predictor.py returns for
a reranked, retrieval-augmented text->image task: the chosen image, every candidate decoded
for the reranker (`candidate_images`), their scores, and the retrieved documents with their
pictures (`image_data`). Everything after it is the project's own code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from evals.cli import main
from reports.html import write_run_report
from reports.leaderboard import collect_runs, leaderboard
from reports.publish import write_leaderboard
from fixtures import EchoPredictor

CHROMIUM = "/usr/bin/chromium"
COLORS = [(220, 40, 40), (40, 170, 60), (40, 60, 220), (230, 190, 30)]
SCORES = [0.31, 0.74, 0.52, 0.18]  # candidate 1 wins


class RerankingPredictor(EchoPredictor):
    def predict(self, batch) -> list[dict]:
        if batch.task.kind != "t2i":
            outs = super().predict(batch)
            for out, it in zip(outs, batch.items):  # the real predictor returns the formatted prompt
                if batch.task.kind == "vqa":
                    out["prompt"] = batch.task.prompt.template.format(question=it.sample.text)
            return outs
        outs = []
        for it in batch.items:
            cands = [Image.new("RGB", (32, 32), c) for c in COLORS]
            docs = [{"id": f"doc-{it.sample.id}-{j}", "text": f"a document about {it.sample.text} #{j}",
                     "image": f"images/bank-{j}.png", "score": 0.9 - 0.1 * j,
                     "image_data": Image.new("RGB", (24, 24), COLORS[j])} for j in range(2)]
            outs.append({"prompt": it.sample.text, "images": {"output": cands[1]}, "candidate_images": cands,
                         "scores": list(SCORES), "best": 1, "retrieved": docs,
                         "extra": {"codes": [[j] * 4 for j in range(4)]}})
        return outs


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("views") / "run"
    factory = lambda **kw: RerankingPredictor()  # noqa: E731
    assert main(["run", "shapes-vqa", "shapes-edit", "--limit", "3", "--out", str(out)],
                predictor_factory=factory) == 0
    assert main(["run", "shapes-fid", "--limit", "2", "--candidates", "4", "--set", "generation.rerank=true",
                 "--out", str(out)], predictor_factory=factory) == 0
    return out


def test_sample_lines_keep_the_reports_thumbnails(run_dir):
    line = json.loads((run_dir / "shapes-fid" / "samples" / "rank-00000.jsonl").read_text().splitlines()[0])
    assert set(line["images"]) == {"output", "reference"} and len(line["candidate_thumbnails"]) == 4
    assert [d["thumbnail"] for d in line["retrieved"]] == [f"images/0000000-{line['id']}-doc{j}.png" for j in (0, 1)]
    assert all("image_data" not in d for d in line["retrieved"])
    small = Image.open(run_dir / "shapes-fid" / line["candidate_thumbnails"][2])
    assert small.getpixel((0, 0)) == COLORS[2]  # each candidate's own picture, in order


def test_report_page_sections(run_dir):
    html = write_run_report(run_dir).read_text()
    top = html.split('id="metrics"', 1)[0]
    assert "Protocol deviations" in top and "a --limit 3 subset" in top and "a --limit 2 subset" in top
    data = json.loads((run_dir / "metrics.json").read_text())
    assert len(data["run"]["commands"]) == 2  # both invocations
    assert html.count("<li><code>") >= 2 and "--candidates 4" in html
    assert "accuracy by answer type" in html and "accuracy by question type" in html
    vqa = html.split('id="task-0"', 1)[1].split("</section>", 1)[0]
    assert "Question:" not in vqa  # the bare question, not the prompt template


def _launch(p):
    return p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"])


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"headless Chromium not found at {CHROMIUM}")
def test_text_to_image_card_in_chromium(run_dir):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) not installed")
    page_path = write_run_report(run_dir)
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            labels = page.locator("nav.tab-labels label").all_inner_texts()
            page.click(f"label[for=tab-{labels.index('shapes-fid')}]")
            card = page.locator(f"#panel-{labels.index('shapes-fid')} #grid-{labels.index('shapes-fid')} "
                                "article.sample").first
            figs = card.locator("div.grid-row > figure")
            captions = figs.locator("figcaption").all_inner_texts()
            assert captions[0] == "reference"
            assert captions[1:] == ["#0 · score 0.31", "#1 · score 0.74 ★ chosen", "#2 · score 0.52",
                                    "#3 · score 0.18"]
            assert card.locator("figure.reference img").count() == 1
            assert card.locator("figure.winner figcaption").inner_text() == "#1 · score 0.74 ★ chosen"
            loaded = figs.locator("img").evaluate_all("els => els.map(i => i.complete && i.naturalWidth > 0)")
            assert loaded == [True] * 5  # the reference and all four candidates are images, all visible
            assert all(figs.nth(i).is_visible() for i in range(5))
            docs = card.locator("li.doc")
            assert docs.count() == 2 and "a document about" in docs.first.inner_text()
            assert docs.locator("img").evaluate_all("els => els.map(i => i.naturalWidth > 0)") == [True, True]
            card.screenshot(path=str(run_dir / "card.png"))
            # the edit card: input → output | target, one row
            page.click(f"label[for=tab-{labels.index('shapes-edit')}]")
            edit = page.locator(f"#grid-{labels.index('shapes-edit')} article.sample").first
            tops = edit.locator("div.grid-row > figure").evaluate_all(
                "els => els.map(e => Math.round(e.getBoundingClientRect().top))")
            assert len(tops) == 3 and len(set(tops)) == 1, tops
            assert edit.locator("figcaption").all_inner_texts() == ["input", "output", "target"]
            edit.screenshot(path=str(run_dir / "edit.png"))
            page.click("label[for=tab-0]")
            page.screenshot(path=str(run_dir / "page.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    for name in ("card.png", "edit.png", "page.png"):
        Path("/tmp/cm3eval-views").mkdir(exist_ok=True)
        (Path("/tmp/cm3eval-views") / name).write_bytes((run_dir / name).read_bytes())


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"headless Chromium not found at {CHROMIUM}")
def test_leaderboard_marks_an_n2_vqa_row_in_chromium(run_dir, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) not installed")
    small = tmp_path / "small"
    assert main(["run", "shapes-vqa", "--limit", "2", "--out", str(small)],
                predictor_factory=lambda **kw: RerankingPredictor()) == 0
    data = json.loads((small / "metrics.json").read_text())
    data["tasks"]["vqav2"] = data["tasks"].pop("shapes-vqa")  # beside Flamingo's published vqav2 row
    (small / "metrics.json").write_text(json.dumps(data))
    (small / "shapes-vqa").rename(small / "vqav2")
    (page_path,) = write_leaderboard(leaderboard(collect_runs([small])), tmp_path / "lb", ["html"])
    with sync_api.sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page()
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            table = page.locator("h2.task-table", has_text="vqav2").locator("xpath=following-sibling::div[1]//table")
            headers = table.locator("th").all_inner_texts()
            col = headers.index("accuracy (%) ↑")
            mine = table.locator("tr.measured").first.locator("td").all_inner_texts()
            assert mine[col].endswith("†") and "n=2: a --limit 2 subset" in mine[-1]
            flamingo = table.locator("tr.published", has_text="Flamingo-9B").locator("td").all_inner_texts()
            assert not flamingo[col].endswith("†")
        finally:
            browser.close()


def test_sweep_plot_on_the_display_scale(tmp_path):
    from reports.html import charts

    for cider, point in ((1.1, "cfg_scale=1"), (1.3, "cfg_scale=3")):
        (tmp_path / point / "cap").mkdir(parents=True)
        (tmp_path / point / "cap" / "config.json").write_text(json.dumps(
            {"task": {"name": "cap"}, "model": "m", "overrides": {"generation.cfg_scale": float(point[-1])}}))
        entry = {"metrics": {"CIDEr": {"value": cider, "ci": None, "n": 5, "higher_is_better": True}},
                 "failures": [], "n_samples": 5}
        (tmp_path / point / "metrics.json").write_text(json.dumps({"run": {"model": "m"}, "tasks": {"cap": entry}}))
    runs = [tmp_path / "cfg_scale=1", tmp_path / "cfg_scale=3"]
    for frame in (collect_runs(runs), leaderboard(collect_runs(runs), baselines=False)):  # raw and scaled frames
        (chart,) = charts(frame)
        tips = [m.tip for line in chart.lines for m in line.marks]
        assert [t.rsplit(" ", 1)[1] for t in tips] == ["110", "130"], tips
        assert chart.y_label.startswith("CIDEr (x100)")
