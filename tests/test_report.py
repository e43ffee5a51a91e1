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
from shearkit.report.summary import compare, numeric_series, structured_layers

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GEOMETRY = [{"heads": 4, "kv_heads": 2, "head_dim": 16, "mlp": 96} for _ in range(4)]


def _zs(acc, acc_norm=None, limit=20):
    metrics = {"acc": acc} if acc_norm is None else {"acc": acc, "acc_norm": acc_norm}
    main = "acc" if acc_norm is None else "acc_norm"
    return {"metrics": metrics, "value": metrics[main], "metric": main, "harness_version": "0.4.13",
            "task_version": 1.0, "limit": limit, "num_fewshot": 0, "batch_size": 1}


def _ppl(v, seqlen=512):
    return {"metric": "ppl_concat", "value": v, "ppl": v, "seqlen": seqlen, "limit": 8}


def _write_run(path: Path, plan: Plan | None, tasks: dict, dense: dict | None = None, log: list | None = None,
               method: str = "llm-pruner") -> Path:
    path.mkdir(parents=True)
    (path / "recipe.yaml").write_text(yaml.safe_dump({"model": {"name": "tiny"}, "prune": {"method": method,
                                                                                          "ratio": 0.25}}))
    metrics = {"model": "tiny", "tasks": tasks, "params": {"unique": 750_000}}
    if dense is not None:
        metrics["dense"] = {"tasks": dense, "params": {"unique": 1_000_000}}
    if plan is not None:
        metrics["prune"] = {"method": plan.method, "kind": plan.kind, "ratio_target": plan.ratio_target,
                            "ratio_achieved": plan.ratio_achieved, "wall_s": 1.5, "peak_memory_bytes": 3 * 2**20}
        plan.save(path / "plan.json")
    if log is not None:
        metrics["recover"] = {"steps": log[-1]["step"], "wall_s": 12.0}
        (path / "recovery").mkdir()
        (path / "recovery" / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log)
                                                           + '{"step": 99, "loss"')  # a line cut off mid-write
    (path / "env.json").write_text(json.dumps({"device": "cpu", "seed": 0, "versions": {"torch": "2.x"}}))
    (path / "metrics.json").write_text(json.dumps(metrics))
    return path


def _structured_plan() -> Plan:
    layers = {"0": {"heads": [0], "kv_groups": [], "mlp_channels": list(range(10))},
              "1": {"heads": [], "kv_groups": [1], "mlp_channels": list(range(48))},
              "2": {"heads": [2, 3], "kv_groups": [], "mlp_channels": []}}
    return Plan("llm-pruner", "structured", 0.25, 0.248,
                base={"name": "tiny", "num_layers": 4, "fingerprint": "abc", "geometry": GEOMETRY},
                layers=layers, blocks=[3],
                extra={"layer_importance": [0.9, 0.2, 0.4, 0.1],
                       "knowledge_distribution": {"attn": [1.0, 0.5, 0.2, 0.8], "mlp": [0.3, 0.1, 0.2, 0.9]},
                       "note": "not plotted", "by_layer": {"0": 1.0, "1": 2.0, "2": 0.5, "3": 0.0}})


def _structured_run(root: Path) -> Path:
    log = [{"step": 0, "eval_ppl": {"wikitext2": 80.0}}]
    log += [{"step": s, "loss": 4.0 - s / 10, "lr": 1e-4 * (1 - s / 20), "tokens_seen": 512 * s} for s in range(1, 21)]
    log[-1]["eval_ppl"] = {"wikitext2": 50.0}
    return _write_run(root / "lp25", _structured_plan(),
                      {"wikitext2": _ppl(48.2), "piqa_local": _zs(0.61, 0.6), "boolq_local": _zs(0.55)},
                      dense={"wikitext2": _ppl(30.6), "piqa_local": _zs(0.66, 0.65), "boolq_local": _zs(0.6)},
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
    assert got == [(0, "kept", 3, 2, 86), (1, "kept", 2, 1, 48), (2, "kept", 2, 1, 96), (3, "removed", 0, 0, 0)]


def test_structured_layers_without_base_widths_report_removed_counts():
    plan = _structured_plan().to_dict()
    del plan["base"]["geometry"]
    rows = structured_layers(plan)
    assert [(r.heads_removed, r.kv_removed, r.mlp_removed, r.heads_kept) for r in rows] == [
        (1, 0, 10, None), (0, 1, 48, None), (2, 0, 0, None), (0, 0, 0, None)]


def test_numeric_series_keeps_only_plottable_entries():
    got = dict(numeric_series(_structured_plan().extra))
    assert got == {"layer_importance": {"layer_importance": [0.9, 0.2, 0.4, 0.1]},
                   "knowledge_distribution": {"attn": [1.0, 0.5, 0.2, 0.8], "mlp": [0.3, 0.1, 0.2, 0.9]},
                   "by_layer": {"by_layer": [1.0, 2.0, 0.5, 0.0]}}


def test_compare_aligns_tasks_and_adds_the_zero_shot_mean(runs):
    cmp = compare(load_run(runs[0]), [load_run(runs[1])])
    assert cmp.columns == ["dense", "lp25", "wanda50"]
    rows = {(t, m): v for t, m, v in cmp.rows}
    assert rows[("wikitext2", "ppl_concat")] == [30.6, 48.2, 60.0]
    assert rows[("piqa_local", "acc_norm")] == [0.65, 0.6, 0.57]
    assert rows[("boolq_local", "acc")] == [0.6, 0.55, None]  # the other run did not measure BoolQ
    dense_mean, run_mean, other_mean = rows[("mean (zero-shot)", "main metric")]
    assert (dense_mean, run_mean, other_mean) == (pytest.approx(0.625), pytest.approx(0.575), None)


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
    assert re.search(r"\| wikitext2 \| ppl_concat \| 30\.6 \| 48\.2 \| 60 \| \+17\.6 \|", md)
    assert "| 1 | kept | 2/4 | 1/2 | 48/96 |" in md and "| 3 | removed | 0/4 | 0/2 | 0/96 |" in md
    assert "method: llm-pruner" in md and "1 line(s) of recovery/train_log.jsonl were not readable" in md


def test_unstructured_report_tabulates_sparsity(tmp_path):
    md = (write_report(_unstructured_run(tmp_path)) / "report.md").read_text()
    assert "| layer | pattern | self_attn.q_proj | mlp.down_proj |" in md
    assert "| 3 | 2:4 | 0.5 | 0.55 |" in md
    assert "Recovery" not in md  # no training log, no section


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
    (run / "report" / "stale.txt").write_text("old")
    with pytest.raises(ShearkitError, match="already holds a report; pass --overwrite"):
        write_report(run)  # never silently
    assert (run / "report" / "stale.txt").exists()
    write_report(run, overwrite=True)  # a previous report is replaced whole
    assert not (run / "report" / "stale.txt").exists()
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
