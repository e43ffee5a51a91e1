"""Reports: run directories (written here as the pipeline writes them) become markdown and one
self-contained HTML page; a real headless browser renders the page."""
from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from shearkit.errors import ShearkitError
from shearkit.plan import Plan
from shearkit.report import load_run, write_report
from shearkit.report import plots, summary
from shearkit.report.summary import compare, numeric_series, structured_layers

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GEOMETRY = [{"heads": 4, "kv_heads": 2, "head_dim": 16, "mlp": 96} for _ in range(6)]
LAYER_PARAMS = 20_000


def _zs(acc, acc_norm=None, limit=20):
    metrics = {"acc": acc} if acc_norm is None else {"acc": acc, "acc_norm": acc_norm}
    main = "acc" if acc_norm is None else "acc_norm"
    return {"metrics": metrics, "value": metrics[main], "metric": main, "harness_version": "0.4.13",
            "task_version": 1.0, "limit": limit, "num_fewshot": 0, "batch_size": 1}


def _ppl(v, seqlen=512):
    return {"metric": "ppl_concat", "value": v, "ppl": v, "seqlen": seqlen, "limit": 8}


def _write_run(path: Path, plan: Plan | None, tasks: dict, dense: dict | None = None, log: list | None = None,
               method: str = "llm-pruner", pruned: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "recipe.yaml").write_text(yaml.safe_dump({"model": {"name": "tiny"}, "prune": {"method": method,
                                                                                          "ratio": 0.25}}))
    metrics = {"model": "tiny", "tasks": tasks, "params": {"unique": 750_000}}
    if dense is not None:
        metrics["dense"] = {"tasks": dense, "params": {"unique": 1_000_000}}
    if pruned is not None:  # measured after pruning, before recovery (as the pipeline does)
        metrics["pruned"] = {"tasks": pruned}
    if plan is not None:
        metrics["prune"] = {"method": plan.method, "kind": plan.kind, "ratio_target": plan.ratio_target,
                            "ratio_achieved": plan.ratio_achieved, "wall_s": 1.5, "peak_memory_bytes": 3 * 2**20}
        plan.save(path / "plan.json")
    if log is not None:
        metrics["recover"] = {"steps": log[-1]["step"], "wall_s": 12.0, "log": "recovery/train_log.jsonl",
                              "plot": "recovery/loss.png"}
        (path / "recovery").mkdir()
        (path / "recovery" / "loss.png").write_bytes(PNG_MAGIC)
        (path / "recovery" / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log)
                                                           + '{"step": 99, "loss"')  # a line cut off mid-write
    (path / "env.json").write_text(json.dumps({"device": "cpu", "seed": 0, "seeds": {"calib.seed": 0, "prune.seed": 0},
                                               "versions": {"torch": "2.x"}}))
    (path / "metrics.json").write_text(json.dumps(metrics))
    return path


def _structured_plan() -> Plan:
    layers = {"0": {"heads": [0], "kv_groups": [], "mlp_channels": list(range(10))},
              "1": {"heads": [], "kv_groups": [1], "mlp_channels": list(range(48))},
              "2": {"heads": [2, 3], "kv_groups": [], "mlp_channels": []}}
    return Plan("llm-pruner", "structured", 0.25, 0.248,
                base={"name": "tiny", "num_layers": 6, "fingerprint": "abc", "geometry": GEOMETRY},
                layers=layers, blocks=[3],
                extra={"layer_importance": [0.9, 0.2, 0.4, 0.1],
                       "knowledge_distribution": {"attn": [1.0, 0.5, 0.2, 0.8], "mlp": [0.3, 0.1, 0.2, 0.9]},
                       "note": "not plotted", "by_layer": {"0": 1.0, "1": 2.0, "2": 0.5, "3": 0.0},
                       "calib_scale": [2.0, 2.0, 2.0, 2.0],
                       # what the structured planner records (graph/planner.py finish_plan)
                       "dense_layers": [4, 5], "layer_params": [LAYER_PARAMS] * 6,
                       "params_removed": [2000, 9000, 5000, LAYER_PARAMS, 0, 0]})


def _structured_run(root: Path) -> Path:
    log = [{"step": 0, "eval_ppl": {"wikitext2": 80.0}}]
    log += [{"step": s, "loss": 4.0 - s / 10, "lr": 1e-4 * (1 - s / 20), "tokens_seen": 512 * s} for s in range(1, 21)]
    log[-1]["eval_ppl"] = {"wikitext2": 50.0}
    return _write_run(root / "lp25", _structured_plan(),
                      {"wikitext2": _ppl(48.2), "piqa_local": _zs(0.61, 0.6), "boolq_local": _zs(0.55)},
                      dense={"wikitext2": _ppl(30.6), "piqa_local": _zs(0.66, 0.65), "boolq_local": _zs(0.6)},
                      pruned={"wikitext2": _ppl(95.0), "piqa_local": _zs(0.55, 0.52), "boolq_local": _zs(0.5)},
                      log=log)


def _unstructured_run(root: Path) -> Path:
    layers = {str(i): {"sparsity": {"self_attn.q_proj": 0.5, "mlp.down_proj": 0.4 + 0.05 * i}, "pattern": "2:4"}
              for i in range(4)}
    plan = Plan("wanda", "unstructured", 0.5, 0.5, base={"name": "tiny", "num_layers": 4}, layers=layers)
    return _write_run(root / "wanda50", plan, {"wikitext2": _ppl(60.0), "piqa_local": _zs(0.58, 0.57)},
                      method="wanda")


def _eval_run(root: Path, name: str, tasks: dict) -> Path:
    ev = root / name
    ev.mkdir()
    (ev / "metrics.json").write_text(json.dumps({"model": "tiny", "tasks": tasks}))
    return ev


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    return _structured_run(root), _unstructured_run(root)


@pytest.fixture(scope="module")
def report(runs) -> Path:
    """The report of the structured run compared with the unstructured one, written once (plots take seconds)."""
    return write_report(runs[0], vs=[runs[1]])


# -- summaries -----------------------------------------------------------------------------------

def test_structured_layers_count_kept_widths_with_kv_groups_closed():
    rows = structured_layers(_structured_plan().to_dict())
    got = [(r.layer, r.status, r.heads_kept, r.kv_kept, r.mlp_kept) for r in rows]
    # layer 1 removes KV group 1, which takes query heads 2 and 3 along; layer 2 removes both query
    # heads of KV group 1, which removes that group; block 3 is removed whole
    assert got == [(0, "kept", 3, 2, 86), (1, "kept", 2, 1, 48), (2, "kept", 2, 1, 96), (3, "removed", 0, 0, 0),
                   (4, "dense (not pruned)", 4, 2, 96), (5, "dense (not pruned)", 4, 2, 96)]


def test_structured_layers_without_base_widths_report_removed_counts():
    plan = _structured_plan().to_dict()
    del plan["base"]["geometry"]
    rows = structured_layers(plan)
    assert [(r.heads_removed, r.kv_removed, r.mlp_removed, r.heads_kept) for r in rows] == [
        (1, 0, 10, None), (0, 1, 48, None), (2, 0, 0, None), (0, 0, 0, None), (0, 0, 0, None), (0, 0, 0, None)]


def test_structured_layers_mark_dense_layers_and_kept_fractions():
    rows = structured_layers(_structured_plan().to_dict())
    assert [r.layer for r in rows if r.dense] == [4, 5]  # the plan's dense_layers, not bar heights
    fr = [r.kept_fractions() for r in rows]
    assert fr[1] == {"query heads": 0.5, "KV heads": 0.5, "MLP channels": 0.5, "parameters": 1 - 9000 / LAYER_PARAMS}
    assert fr[3] == {"query heads": 0.0, "KV heads": 0.0, "MLP channels": 0.0, "parameters": 0.0}  # removed block
    assert fr[4] == {"query heads": 1.0, "KV heads": 1.0, "MLP channels": 1.0, "parameters": 1.0}


def test_numeric_series_keeps_only_plottable_entries():
    got = dict(numeric_series(_structured_plan().extra))
    assert got == {"layer_importance": {"layer_importance": [0.9, 0.2, 0.4, 0.1]},
                   "knowledge_distribution": {"attn": [1.0, 0.5, 0.2, 0.8], "mlp": [0.3, 0.1, 0.2, 0.9]},
                   "by_layer": {"by_layer": [1.0, 2.0, 0.5, 0.0]},
                   "calib_scale": {"calib_scale": [2.0, 2.0, 2.0, 2.0]},
                   "dense_layers": {"dense_layers": [4.0, 5.0]},
                   "layer_params": {"layer_params": [float(LAYER_PARAMS)] * 6},
                   "params_removed": {"params_removed": [2000.0, 9000.0, 5000.0, float(LAYER_PARAMS), 0.0, 0.0]}}


def test_compare_has_each_stage_of_the_run_and_the_zero_shot_mean(runs):
    cmp = compare(load_run(runs[0]), [load_run(runs[1])])
    assert cmp.columns == ["dense", "pruned, before recovery", "lp25 (recovered)", "wanda50"]
    assert cmp.stage == {"dense": 0, "pruned": 1, "final": 2}
    rows = {(t, m): v for t, m, v in cmp.rows}
    assert rows[("wikitext2", "ppl_concat")] == [30.6, 95.0, 48.2, 60.0]
    assert rows[("piqa_local", "acc_norm")] == [0.65, 0.52, 0.6, 0.57]
    assert rows[("boolq_local", "acc")] == [0.6, 0.5, 0.55, None]  # the other run did not measure BoolQ
    means = rows[("mean (zero-shot)", "main metric")]
    assert means == [pytest.approx(0.625), pytest.approx(0.51), pytest.approx(0.575), None]


def test_metrics_figure_data_shows_what_recovery_did(runs):
    """The metrics figure draws each task's main metric for dense, pruned before recovery and
    recovered (and the runs compared): the data it is drawn from, panel by panel."""
    panels = summary.metric_panels(compare(load_run(runs[0]), [load_run(runs[1])]))
    acc, ppl = panels
    assert (acc.lower_is_better, acc.tasks, ppl.lower_is_better, ppl.tasks) == (
        False, ["piqa_local", "boolq_local"], True, ["wikitext2"])
    assert dict(ppl.series) == {"dense": [30.6], "pruned, before recovery": [95.0], "lp25 (recovered)": [48.2],
                                "wanda50": [60.0]}
    assert dict(acc.series) == {"dense": [0.65, 0.6], "pruned, before recovery": [0.52, 0.5],
                                "lp25 (recovered)": [0.6, 0.55], "wanda50": [0.57, None]}


def test_loss_legend_hides_no_point():
    """The legends sit outside the plotting area, so no point (the last one in particular, labelled with
    its value) is under a legend, whatever the curve does."""
    log = [{"step": s, "loss": 3.0 + (s % 3) / 10 + (1.0 if s > 35 else 0), "lr": 1e-4} for s in range(1, 41)]
    for r in log[4::5]:
        r["eval_ppl"] = {"wikitext2": 40.0 + r["step"]}
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = plots.loss_figure(log, "t")
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    legends = [a.get_legend().get_window_extent(renderer) for a in fig.axes if a.get_legend()]
    assert legends
    lines = [ln for a in fig.axes for ln in a.get_lines() if len(ln.get_xdata())]
    assert len(lines) >= 3  # loss, its trend, perplexity
    for ln in lines:
        for x, y in zip(ln.get_xdata(), ln.get_ydata()):
            px, py = ln.axes.transData.transform((x, y))
            assert not any(b.contains(px, py) for b in legends), (ln.get_label(), x, y)
    texts = [t.get_text() for a in fig.axes for t in a.texts]
    assert {f"{log[-1]['loss']:.4g}", f"{40.0 + 40:.4g}"} <= set(texts)  # last loss and perplexity, as numbers


# -- the written report --------------------------------------------------------------------------

class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tables, self.external = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        if tag == "table":
            self.tables.append(a.get("class"))
        for k in ("src", "href"):
            if a.get(k) and not a[k].startswith(("data:", "#")):
                self.external.append(a[k])


def test_report_files_and_self_contained_html(runs, report):
    out = report
    assert out == runs[0] / "report"
    html = (out / "report.html").read_text()
    page = _Page()
    page.feed(html)
    assert page.external == []  # nothing to fetch: one file is the whole report
    assert {"metrics", "plan-info", "plan-layers", "recovery", "runs", "env"} <= set(page.tables)
    figs = {p.stem for p in (out / "figures").glob("*.png")}
    # the planner's records (dense layers, layer sizes) show in the plan figure, and a series whose
    # values are all equal is a sentence, not a figure of identical bars
    assert figs == {"metrics", "plan", "loss", "extra-layer-importance", "extra-knowledge-distribution",
                    "extra-by-layer"}
    assert len(page.imgs) == len(figs)
    for img in page.imgs:  # every inlined image is a real PNG
        assert base64.b64decode(img["src"].split(",", 1)[1]).startswith(PNG_MAGIC)
    md = (out / "report.md").read_text()
    for f in figs:
        assert f"(figures/{f}.png)" in md and (out / "figures" / f"{f}.png").read_bytes().startswith(PNG_MAGIC)
    # figures in the page and on disk are the same images
    assert sorted(base64.b64decode(i["src"].split(",", 1)[1]) for i in page.imgs) == sorted(
        p.read_bytes() for p in (out / "figures").glob("*.png"))
    # the metrics row with the delta against the dense model, the per-layer kept widths, the recipe
    # dense, pruned before recovery, recovered, the other run; the deltas against dense and by recovery
    assert "| task | metric | dense | pruned, before recovery | lp25 (recovered) | wanda50 | Δ lp25 (recovered) vs " \
           "dense | Δ by recovery |" in md
    assert re.search(r"\| wikitext2 \| ppl_concat \| 30\.6 \| 95 \| 48\.2 \| 60 \| \+17\.6 \| -46\.8 \|", md)
    assert "wikitext2 ppl_concat: 30.6 dense, 95 pruned before recovery, 48.2 final." in md
    assert "| 1 | kept | 2/4 | 1/2 | 48/96 | 55.0% |" in md and "| 3 | removed | 0/4 | 0/2 | 0/96 | 0.0% |" in md
    assert "| 4 | dense (not pruned) | 4/4 | 2/2 | 96/96 | 100.0% |" in md
    assert "green: dense layers, left unpruned" in md and "calib scale: all 4 values are 2." in md
    assert "method: llm-pruner" in md and "1 line(s) of recovery/train_log.jsonl were not readable" in md
    assert "| loss plot | recovery/loss.png |" in md and "| calib.seed | 0 |" in md


class _Prose(HTMLParser):
    """The page's text outside <code> and <pre>, and the text inside <code>."""

    def __init__(self):
        super().__init__()
        self.depth, self.prose, self.code = 0, [], []

    def handle_starttag(self, tag, attrs):
        self.depth += tag in ("code", "pre")

    def handle_endtag(self, tag):
        self.depth -= tag in ("code", "pre")

    def handle_data(self, data):
        (self.code if self.depth else self.prose).append(data)


def test_html_renders_inline_code_without_backticks(report):
    md = (report / "report.md").read_text()
    assert "`shearkit run`" in md  # markdown keeps its code spans
    page = _Prose()
    page.feed((report / "report.html").read_text())
    prose = "".join(page.prose)
    assert "`" not in prose, prose[max(0, prose.find("`") - 80):prose.find("`") + 80]
    assert "shearkit run" in page.code


def test_recovery_files_resolve_from_a_moved_run_directory(runs, tmp_path, monkeypatch):
    """metrics.json names recovery files relative to the run directory; the report finds them after
    the directory moved, and so it does with paths older runs recorded from the caller's directory."""
    moved = tmp_path / "elsewhere" / "lp25"
    shutil.copytree(runs[0], moved)
    m = json.loads((moved / "metrics.json").read_text())
    m["recover"]["plot"] = "runs/lp25/recovery/loss.png"  # as an older shearkit wrote it, from the cwd
    (moved / "metrics.json").write_text(json.dumps(m))
    monkeypatch.chdir(tmp_path)
    run = load_run(moved)
    assert run.find(m["recover"]["log"]) == moved / "recovery" / "train_log.jsonl"
    assert run.find(m["recover"]["plot"]) == moved / "recovery" / "loss.png"
    assert run.find("recovery/adapter") is None
    md = (write_report(moved, overwrite=True) / "report.md").read_text()
    assert "| loss plot | recovery/loss.png |" in md and "| training log | recovery/train_log.jsonl |" in md


def test_unstructured_report_tabulates_sparsity(tmp_path):
    md = (write_report(_unstructured_run(tmp_path)) / "report.md").read_text()
    assert "| layer | pattern | self_attn.q_proj | mlp.down_proj |" in md
    assert "| 3 | 2:4 | 0.5 | 0.55 |" in md
    assert "Recovery" not in md  # no training log, no section


def test_uniform_sparsity_is_a_sentence_not_flat_lines(tmp_path):
    layers = {str(i): {"sparsity": {"self_attn.q_proj": 0.5, "mlp.down_proj": 0.5}, "pattern": "2:4"} for i in range(4)}
    plan = Plan("wanda", "unstructured", 0.5, 0.5, base={"name": "tiny", "num_layers": 4}, layers=layers)
    out = write_report(_write_run(tmp_path / "w", plan, {"wikitext2": _ppl(60.0)}, method="wanda"))
    md = (out / "report.md").read_text()
    assert "Every module of every layer has sparsity 50.0% (2:4)." in md and "| 3 | 2:4 | 0.5 | 0.5 |" in md
    assert not (out / "figures" / "plan.png").exists()


def test_blocks_plan_and_eval_only_run(tmp_path):
    plan = Plan("shortgpt", "blocks", 0.25, 0.25, base={"name": "tiny", "num_layers": 4}, blocks=[2],
                replaced={"3": 1})
    run = _write_run(tmp_path / "sg", plan, {"wikitext2": _ppl(70.0)}, method="shortgpt")
    md = (write_report(run) / "report.md").read_text()
    assert "| 2 | removed |" in md and "| 3 | replaced by 1 |" in md
    ev = _eval_run(tmp_path, "eval", {"piqa_local": _zs(0.6, 0.61)})
    md = (write_report(ev) / "report.md").read_text()
    assert "An evaluation run (no plan)." in md and "| piqa_local | acc_norm | 0.61 |" in md


def test_protocol_table_and_mismatch_warning(report, tmp_path):
    md = (report / "report.md").read_text()
    assert "| piqa_local | harness_version=0.4.13, limit=20, num_fewshot=0, task_version=1.0 |" in md
    a = _eval_run(tmp_path, "a", {"wikitext2": _ppl(40.0, seqlen=512)})
    b = _eval_run(tmp_path, "b", {"wikitext2": _ppl(40.0, seqlen=2048)})
    md = (write_report(a, vs=[b]) / "report.md").read_text()
    assert "Warning: 'wikitext2' was measured under different protocols" in md and "seqlen=2048" in md


def test_report_regenerates_and_refuses_foreign_out(tmp_path):
    run = _eval_run(tmp_path, "ev", {"piqa_local": _zs(0.6, 0.61)})
    write_report(run)
    with pytest.raises(ShearkitError, match="already holds a report; pass --overwrite"):
        write_report(run)  # never silently
    before = (run / "report" / "report.md").stat().st_mtime_ns
    (run / "report" / "figures" / "stale.png").write_bytes(b"old")
    write_report(run, overwrite=True)  # a previous report (its figures included) is replaced whole
    assert not (run / "report" / "figures" / "stale.png").exists()
    assert (run / "report" / "report.md").stat().st_mtime_ns != before
    (run / "report" / "stale.txt").write_text("mine")  # a user's file beside the report: never deleted
    with pytest.raises(ShearkitError, match=r"not a shearkit report \(stale.txt\)"):
        write_report(run, overwrite=True)
    assert (run / "report" / "stale.txt").read_text() == "mine"
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for overwrite in (False, True):  # not even with --overwrite
        with pytest.raises(ShearkitError, match="not a shearkit report"):
            write_report(run, out=foreign, overwrite=overwrite)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_bad_run_directories(tmp_path):
    with pytest.raises(ShearkitError, match="does not exist"):
        write_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShearkitError, match="not a shearkit run directory"):
        write_report(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "metrics.json").write_text("{oops")
    with pytest.raises(ShearkitError, match="metrics.json is not valid JSON"):
        write_report(tmp_path / "broken")


def test_cli_report(tmp_path):
    from typer.testing import CliRunner

    from shearkit.cli import app

    a = _eval_run(tmp_path, "a", {"piqa_local": _zs(0.6, 0.61)})
    b = _eval_run(tmp_path, "b", {"piqa_local": _zs(0.5, 0.52)})
    res = CliRunner().invoke(app, ["report", str(a), "--vs", str(b), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert "report.html" in res.output
    assert "| piqa_local | acc_norm | 0.61 | 0.52 |" in (tmp_path / "rep" / "report.md").read_text()


# -- a real browser ------------------------------------------------------------------------------

def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _browser(*args: str) -> subprocess.CompletedProcess:
    exe = _chromium()
    if exe is None:
        pytest.skip("no chromium: install it with `apt-get install -y chromium` (.ci/run does)")
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
                           "--virtual-time-budget=5000", *args], capture_output=True, text=True, timeout=120)


def test_headless_browser_renders_tables_and_images(report, tmp_path):
    out = tmp_path
    shutil.copy(report / "report.html", out / "report.html")
    page = (out / "report.html").resolve().as_uri()
    # after layout, the script measures what was actually drawn: decoded images and table cells
    probe = out / "probe.html"
    probe.write_text((out / "report.html").read_text().replace("</body>", """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 100 && i.getBoundingClientRect().width > 100);
  const cells = document.querySelectorAll('table.metrics tbody td');
  const t = document.querySelector('table.metrics').getBoundingClientRect();
  document.body.setAttribute('data-probe', JSON.stringify({images: imgs.length, drawn: ok.length,
    cells: cells.length, table_h: Math.round(t.height)}));
});
</script></body>"""))
    res = _browser("--dump-dom", probe.resolve().as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    m = re.search(r'data-probe="([^"]+)"', res.stdout)
    assert m, res.stdout[-2000:]
    probe_data = json.loads(m.group(1).replace("&quot;", '"'))
    assert probe_data["images"] == 6 and probe_data["drawn"] == 6
    assert probe_data["cells"] >= 4 * 6 and probe_data["table_h"] > 50
    shot = out / "screenshot.png"
    res = _browser(f"--screenshot={shot}", "--window-size=1200,3000", page)
    assert res.returncode == 0 and shot.read_bytes().startswith(PNG_MAGIC)
