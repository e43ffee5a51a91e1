"""Write docs/errors.md: every user-facing error shearkit raises, found in the code, grouped by what the
user did, with the test that makes it happen.

The errors are read from the source (every `ShearkitError(...)` call, and every call of a function that
builds one, such as `unknown(...)`), so the page cannot miss one. Which test makes each happen is
recorded by running the test suite with `SHEARKIT_RECORD_ERRORS` set (`shearkit.errors` then logs where
each error was raised and by which test) and is kept in tests/error_tests.json; tests/conftest.py checks,
on every test run, that each listed test still raises its error, and tests/test_errors_doc.py that
every error has a test and that this page is current.

    python tools/errors_doc.py                      # rewrite docs/errors.md from the code and the mapping
    SHEARKIT_RECORD_ERRORS=/tmp/hits.jsonl python -m pytest -q -p no:cacheprovider
    python tools/errors_doc.py --hits /tmp/hits.jsonl   # then add the tests seen to the mapping
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "shearkit"
DOC = ROOT / "docs" / "errors.md"
MAPPING = ROOT / "tests" / "error_tests.json"

# what the user did, by the module that raises (first matching prefix wins)
GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("Giving a model (a folder, a hub name, a GGUF file, the built-in model)",
     ("models/", "io/weights.py", "io/gguf_load.py", "arch/")),
    ("Choosing a device or a memory limit", ("device.py", "eval/memory.py")),
    ("Writing a recipe (YAML, `--set`)", ("recipe.py", "recovery/config.py", "recovery/dynamic_config.py")),
    ("Giving data (data sets, calibration, training and instruction files)",
     ("data/", "recovery/data.py", "recovery/mixture.py")),
    ("Choosing a method and its options (ratio, sparsity, N:M, the method's knobs)",
     ("methods/", "pruning.py", "sparsity/")),
    ("Analysing a model (`analyze`, `graph`, `--allocation`)",
     ("analysis/", "graph/describe.py", "graph/summary.py", "graph/planner.py")),
    ("Pruning structures the model has or lacks (groups, block surgery, importance)",
     ("graph/", "surgery/", "importance/", "calibration/")),
    ("Training and recovering (`recover`, a method's training)", ("recovery/",)),
    ("Using a plan, masks or a pruned model with a base model", ("plan.py",)),
    ("Extending a model (`shearkit extend`)", ("extension.py",)),
    ("Evaluating and generating (`eval`, `bench`, `generate`)", ("eval/", "speculative.py", "tasks/")),
    ("Saving and exporting (`export`, GGUF, compressed-tensors)", ("io/save.py", "io/gguf_", "io/sparse_export.py",
                                                                  "io/modeling.py", "io/remote_code.py")),
    ("Run directories (`--out`, `--overwrite`, `--resume`) and reports",
     ("runs.py", "io/", "report/")),
    ("Command-line options and the Python API", ("cli/", "pipeline.py", "api.py", "preflight.py", "")),
]


@dataclass
class Site:
    """One place in the code that builds a user-facing error."""

    file: str  # relative to src/shearkit
    qualname: str
    line: int
    end_line: int
    message: str
    group: str = ""
    id: str = ""
    tests: list[str] = field(default_factory=list)


def _short(expr: ast.AST) -> str:
    text = ast.unparse(expr)
    return "{" + (text if len(text) <= 32 else "…") + "}"


def render(node: ast.AST | None, subst: dict[str, str] | None = None) -> str:
    """A message template: the literal text, with `{expression}` where the message is filled in at run time."""
    subst = subst or {}
    if node is None:
        return ""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        out = []
        for part in node.values:
            if isinstance(part, ast.Constant):
                out.append(str(part.value))
            elif isinstance(part, ast.FormattedValue):
                name = ast.unparse(part.value)
                out.append(subst[name] if name in subst else _short(part.value))
        return "".join(out)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return render(node.left, subst) + render(node.right, subst)
    if isinstance(node, ast.Name) and node.id in subst:
        return subst[node.id]
    return _short(node)


def _called_name(call: ast.Call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def _modules(src: Path = SRC) -> list[tuple[str, ast.Module]]:
    return [(str(p.relative_to(src)), ast.parse(p.read_text(encoding="utf-8")))
            for p in sorted(src.rglob("*.py"))]


def _error_classes(modules: list[tuple[str, ast.Module]]) -> set[str]:
    """ShearkitError and the classes derived from it (e.g. WriteFailed)."""
    names, bases = {"ShearkitError"}, {}
    for _, tree in modules:
        for c in ast.walk(tree):
            if isinstance(c, ast.ClassDef):
                bases[c.name] = {ast.unparse(b).rsplit(".", 1)[-1] for b in c.bases}
    while True:
        more = {n for n, b in bases.items() if b & names} - names
        if not more:
            return names
        names |= more


def _factories(modules: list[tuple[str, ast.Module]], errors: set[str]) -> dict[str, tuple[list[str], ast.AST | None]]:
    """Functions that build and return a user-facing error (`-> ShearkitError`, `-> WriteFailed`, ...):
    name -> (parameters, message)."""
    out = {}
    for _, tree in modules:
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef) and _returns_error(fn, errors):
                msg = next((c.args[0] if c.args else None for c in ast.walk(fn)
                            if isinstance(c, ast.Call) and _called_name(c) in errors), None)
                out[fn.name] = ([a.arg for a in fn.args.args], msg)
    return out


def _returns_error(fn: ast.AST, errors: set[str]) -> bool:
    if not isinstance(fn, ast.FunctionDef) or fn.returns is None:
        return False
    return bool(set(ast.unparse(fn.returns).replace("|", " ").split()) & errors)


def _group(file: str) -> str:
    return next(name for name, prefixes in GROUPS if any(file.startswith(p) for p in prefixes))


def find_sites(src: Path = SRC) -> list[Site]:
    """Every place in the package at `src` (default src/shearkit) that builds a user-facing error, in file
    and line order."""
    modules = _modules(Path(src))
    errors = _error_classes(modules)
    factories = _factories(modules, errors)
    sites: list[Site] = []

    for file, tree in modules:
        def visit(node: ast.AST, scope: list[str], in_factory: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    visit(child, [*scope, child.name], in_factory or _returns_error(child, errors))
                    continue
                if isinstance(child, ast.Call):
                    name = _called_name(child)
                    msg = None
                    if name in errors and not in_factory:
                        msg = render(child.args[0] if child.args else None)
                    elif name in factories and not in_factory:
                        params, template = factories[name]
                        subst = {}
                        for p, a in zip(params, child.args):
                            subst[p] = render(a) if isinstance(a, (ast.Constant, ast.JoinedStr)) else _short(a)
                        msg = render(template, subst)
                    if msg is not None:
                        sites.append(Site(file, ".".join(scope) or "<module>", child.lineno,
                                          child.end_lineno or child.lineno, " ".join(msg.split())))
                visit(child, scope, in_factory)

        visit(tree, [], False)
    seen: dict[str, int] = {}
    for s in sites:
        s.group = _group(s.file)
        base = f"{s.file}:{s.qualname}:{hashlib.sha1(s.message.encode()).hexdigest()[:8]}"
        seen[base] = seen.get(base, 0) + 1
        s.id = base if seen[base] == 1 else f"{base}#{seen[base]}"
    return sites


def resolve(sites: list[Site], frames: list[list]) -> Site | None:
    """The site a recorded error came from: the innermost recorded frame that lies within a site's call."""
    by_file: dict[str, list[Site]] = {}
    for s in sites:
        by_file.setdefault(s.file, []).append(s)
    for file, line in frames:
        for s in by_file.get(file, []):
            if s.line <= line <= s.end_line:
                return s
    return None


def read_hits(path: str | Path, sites: list[Site]) -> dict[str, set[str]]:
    """site id -> tests that raised it, from a file written under SHEARKIT_RECORD_ERRORS."""
    out: dict[str, set[str]] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        site = resolve(sites, rec.get("frames") or [])
        if site is not None and rec.get("test"):
            out.setdefault(site.id, set()).add(rec["test"])
    return out


def _preference(test: str) -> tuple:
    """Which recorded test to name for an error: a plain test before fuzzing and kill-and-resume runs, short ids first."""
    heavy = any(k in test for k in ("test_fuzz.py", "test_kill_resume.py", "test_claims.py"))
    return (heavy, len(test), test)


def load_mapping() -> dict[str, list[str]]:
    return json.loads(MAPPING.read_text(encoding="utf-8")) if MAPPING.exists() else {}


def attach_tests(sites: list[Site], mapping: dict[str, list[str]]) -> None:
    for s in sites:
        s.tests = list(mapping.get(s.id, []))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_doc(sites: list[Site]) -> str:
    """The page: one section per thing the user did, one row per error."""
    lines = ["# Errors", "",
             "<!-- generated by `python tools/errors_doc.py` from the code and tests/error_tests.json; "
             "do not edit by hand -->", "",
             "Every error shearkit reports to a user is a `ShearkitError` (a `ValueError`): the command-line tool "
             "prints its message without a traceback and exits with status 2. Each message says what went wrong "
             "and what to change. This page lists every place in the code that raises one, grouped by what you "
             "were doing; `{…}` stands for text filled in at run time (a path, a value, the valid choices). "
             "The last column names a test that makes the error happen; the test suite checks on every run that "
             "it still does.", "",
             f"{len(sites)} errors, {sum(1 for s in sites if s.tests)} with a test.", ""]
    for group, _ in GROUPS:
        rows = [s for s in sites if s.group == group]
        if not rows:
            continue
        lines += [f"## {group}", "", "| Message | Raised in | Tested by |", "|---|---|---|"]
        for s in rows:
            test = f"`{s.tests[0]}`" if s.tests else "**no test**"
            lines.append(f"| {_cell(s.message)} | `{s.file}` `{s.qualname}` | {_cell(test)} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hits", action="append", default=[], help="a SHEARKIT_RECORD_ERRORS file: add the tests "
                    "it saw to tests/error_tests.json (repeatable)")
    ap.add_argument("--src", default=None, help="the shearkit package folder the --hits were recorded with, "
                    "when its lines differ from this checkout's (a copy taken before later edits)")
    ap.add_argument("--check", action="store_true", help="only list the errors without a test (counting the --hits given), writing nothing; exit 1 if any")
    a = ap.parse_args()
    sites = find_sites()
    ids = {s.id for s in sites}
    mapping = {k: v for k, v in load_mapping().items() if k in ids}  # errors no longer in the code drop out
    recorded = find_sites(Path(a.src)) if a.src else sites  # ids do not depend on line numbers
    for path in a.hits:
        for sid, tests in read_hits(path, recorded).items():
            if sid not in ids:
                continue
            mapping[sid] = sorted(set(mapping.get(sid, [])) | tests, key=_preference)[:2]
    attach_tests(sites, mapping)
    missing = [s for s in sites if not s.tests]
    if a.check:
        for s in missing:
            print(f"no test: {s.file}:{s.line} {s.qualname}: {s.message}")
        sys.exit(1 if missing else 0)
    sys.path.insert(0, str(SRC.parent))
    from shearkit.io.atomic import write_json, write_text

    write_json(MAPPING, dict(sorted(mapping.items())))
    write_text(DOC, render_doc(sites))
    print(f"{len(sites)} errors, {len(sites) - len(missing)} with a test; wrote {DOC.relative_to(ROOT)} "
          f"and {MAPPING.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
