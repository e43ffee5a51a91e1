"""Named data sets and where their text comes from.

Resolution order for a named set: an explicit file path; else the local data directory
(`data_dir` argument / `--data-dir`, or $SHEARKIT_DATA) laid out as described in
docs/data.md; else the Hugging Face hub through `datasets` (online only).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ShearkitError, unknown

DATA_ENV = "SHEARKIT_DATA"


@dataclass(frozen=True)
class TextSet:
    """A named text set: local files per split, how rows are read and joined, its hub twin."""

    name: str
    kind: str  # "eval" (perplexity), "text" (calibration / pretraining), "instructions"
    splits: dict[str, tuple[str, ...]]  # split -> files relative to the data dir, concatenated
    joiner: str = "\n\n"
    default_split: str = "test"
    hub: tuple | None = None  # (path, config, {split: hub_split}, text field)
    description: str = ""
    calibration_ok: bool = True
    strip: bool = False  # rows are stripped lines (as the hub script yields them), not raw lines


DATASETS: dict[str, TextSet] = {s.name: s for s in [
    TextSet("wikitext2", "eval", {"test": ("wikitext-2-raw/test.txt",), "train": ("wikitext-2-raw/train.txt",)},
            "\n\n", "test", ("Salesforce/wikitext", "wikitext-2-raw-v1", {}, "text"),
            "WikiText-2 raw; perplexity on the test split, rows joined with '\\n\\n'", calibration_ok=False),
    TextSet("ptb", "eval", {"test": ("ptb/test.txt",), "validation": ("ptb/validation.txt",)},
            " ", "test", ("ptb_text_only", "penn_treebank", {}, "sentence"),
            "Penn Treebank (text only); perplexity on the test split, stripped lines joined with ' '",
            strip=True),
    TextSet("c4", "text", {"train": ("calib/exllamav2_c4.txt", "calib/llamafactory_c4_demo.jsonl")},
            "\n\n", "train", ("allenai/c4", "en", {"train": "validation"}, "text"),
            "C4 web text for calibration and pretraining-style recovery (both local C4 files)"),
    TextSet("wiki", "text", {"train": ("calib/exllamav2_wiki.txt", "calib/llamafactory_wiki_demo.txt")},
            "\n\n", "train", None, "English Wikipedia articles for calibration"),
    TextSet("alpaca", "instructions", {"train": ("alpaca/llamafactory_alpaca_en_demo.json",)}, "\n\n", "train",
            ("yahma/alpaca-cleaned", None, {}, None), "Alpaca-format instructions (instruction/input/output)"),
    TextSet("lima", "instructions", {"train": ("alpaca/llamafactory_lima.json",)}, "\n\n", "train", None,
            "LIMA in Alpaca format"),
    TextSet("gsm8k", "instructions", {"train": ("alpaca/alpacadatacleaned_gsm8k_train.json",)}, "\n\n", "train",
            None, "GSM8K train problems in Alpaca format"),
]}


@dataclass
class TextRows:
    """Rows of text with the record of where they came from."""

    rows: list[str]
    joiner: str
    record: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.joiner.join(self.rows)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The local data directory: the argument, else $SHEARKIT_DATA, else None."""
    d = data_dir or os.environ.get(DATA_ENV)
    if not d:
        return None
    p = Path(d).expanduser()
    if not p.is_dir():
        src = "--data-dir" if data_dir else f"${DATA_ENV}"
        raise ShearkitError(f"The data directory {p} (from {src}) does not exist; point {src} at a folder "
                            "laid out as docs/data.md describes.")
    return p


def load_rows(name: str, split: str | None = None, data_dir: str | os.PathLike | None = None,
              joiner: str | None = None) -> TextRows:
    """Rows of a named set (or of a text/jsonl/json file given by path) for one split."""
    if _looks_like_path(name):
        return _file_rows(Path(name), joiner)
    ds, split = named_split(name, split)
    j = ds.joiner if joiner is None else joiner
    root = resolve_data_dir(data_dir)
    if root is not None:
        files = [root / f for f in ds.splits[split]]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise ShearkitError(f"Data set '{name}' split '{split}' needs {', '.join(missing)}, which is not in the "
                                f"data directory {root}.")
        rows: list[str] = []
        for f in files:
            rows += _read_rows(f, ds.strip)
        if not any(r.strip() for r in rows):
            raise ShearkitError(f"Data set '{name}': {', '.join(map(str, files))} holds no text.")
        return TextRows(rows, j, {"dataset": name, "split": split, "joiner": j,
                                  "source": [str(f) for f in files], **_strip_record(ds)})
    return _hub_rows(ds, split, j)


def named_split(name: str, split: str | None, what: str | None = None) -> tuple[TextSet, str]:
    """The named set and its split (the set's default when None), or a clear error."""
    if name not in DATASETS:
        raise unknown("data set", name, DATASETS)
    ds = DATASETS[name]
    split = split or ds.default_split
    if split not in ds.splits:
        raise ShearkitError(f"{what or f'Data set {name!r}'} has no split '{split}'; splits: {', '.join(ds.splits)}.")
    return ds, split


def _looks_like_path(name: str) -> bool:
    return os.sep in name or name.endswith((".txt", ".jsonl", ".json")) or Path(name).exists()


def _file_rows(path: Path, joiner: str | None) -> TextRows:
    if not path.exists():
        raise ShearkitError(f"Data file not found: {path}")
    rows = _read_rows(path)
    if not any(r.strip() for r in rows):
        raise ShearkitError(f"Data file {path} is empty: give a file with text (one document per line, or "
                            "jsonl with a 'text' field).")
    j = "\n\n" if joiner is None else joiner
    return TextRows(rows, j, {"dataset": str(path), "split": "file", "joiner": j, "source": [str(path)]})


def _strip_record(ds: TextSet) -> dict:
    """The record entry that says a set's rows are stripped lines, so figures on older raw-line text are told apart."""
    return {"rows": "stripped lines"} if ds.strip else {}


def _read_rows(path: Path, strip: bool = False) -> list[str]:
    """Rows of a local file. Plain text: one row per line, as the HF `text` loader gives them
    (blank lines become '', other lines keep their trailing newline, which is what the
    WikiText-2 perplexity protocol joins); with `strip`, each line stripped, as the PTB hub
    script (`ptb_text_only`) yields them. jsonl/json: the `text` field of each record."""
    if path.suffix in (".jsonl", ".json"):
        return [_record_text(r, path, i) for i, r in enumerate(read_records(path))]
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() if strip else (line if line.strip() else "") for line in f]
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None


def read_records(path: Path) -> list:
    """The records of a .json file (a JSON list) or a .jsonl file (one JSON value per non-blank line);
    a file that is not UTF-8 or not valid JSON raises ShearkitError naming the file (and line)."""
    try:
        if path.suffix == ".jsonl":
            recs = []
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    if not line.strip():
                        continue
                    try:
                        recs.append(json.loads(line))
                    except (json.JSONDecodeError, RecursionError) as e:
                        raise ShearkitError(f"{path} line {i + 1} is not valid JSON ({e}); a .jsonl file holds one "
                                            "JSON record per line.") from None
            return recs
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    try:
        recs = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ShearkitError(f"{path} is not valid JSON ({e}); a .json data file holds a list of records "
                            "(use .jsonl for one record per line).") from None
    if not isinstance(recs, list):
        raise ShearkitError(f"{path} holds a JSON {type(recs).__name__}, not a list of records; a .json data file "
                            "holds a list such as [{\"text\": \"...\"}, ...].")
    return recs


def _not_utf8(path: Path, e: UnicodeDecodeError) -> ShearkitError:
    return ShearkitError(f"{path} is not UTF-8 text ({e}); convert it to UTF-8.")


def _record_text(rec, path: Path, i: int) -> str:
    if isinstance(rec, str):
        return rec
    if not isinstance(rec, dict):
        raise ShearkitError(f"{path} record {i} is a {type(rec).__name__}; each record must be a string or an "
                            "object with a 'text' field.")
    for key in ("text", "sentence", "content"):
        if key in rec:
            if not isinstance(rec[key], str):
                raise ShearkitError(f"{path} record {i}: '{key}' must be a string, got {type(rec[key]).__name__}.")
            return rec[key]
    if "instruction" in rec:  # instruction data used as plain text
        parts = [rec.get(k) for k in ("instruction", "input", "output")]
        if not all(x is None or isinstance(x, str) for x in parts):
            raise ShearkitError(f"{path} record {i}: 'instruction', 'input' and 'output' must be strings.")
        return "\n".join(x for x in parts if x)
    raise ShearkitError(f"{path} record {i} has no 'text' field (keys: {', '.join(map(str, rec))}).")


def _hub_rows(ds: TextSet, split: str, joiner: str) -> TextRows:
    if ds.hub is None:
        raise ShearkitError(f"Data set '{ds.name}' needs the local data directory: set ${DATA_ENV} or pass "
                            "--data-dir (a folder laid out as docs/data.md describes).")
    path, config, split_map, field_name = ds.hub
    hub_split = split_map.get(split, split)
    try:
        import datasets

        d = datasets.load_dataset(path, config, split=hub_split)
    except Exception as e:  # offline, or the hub refused
        raise ShearkitError(
            f"Data set '{ds.name}' was not found locally (no data directory: set ${DATA_ENV} or pass --data-dir) "
            f"and the hub did not provide {path} ({type(e).__name__}: {str(e)[:160]})."
        ) from None
    rows = list(d[field_name]) if field_name else [_record_text(r, Path(path), i) for i, r in enumerate(d)]
    return TextRows(rows, joiner, {"dataset": ds.name, "split": split, "joiner": joiner,
                                   "source": [f"hub:{path}/{config}/{hub_split}"], **_strip_record(ds)})


def load_instructions(name: str, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Instruction records (`instruction`, `input`, `output`) of a named set or a json/jsonl path."""
    if _looks_like_path(name):
        path = Path(name)
        if not path.exists():
            raise ShearkitError(f"Instruction file not found: {path}")
        recs = read_records(path)
    else:
        if name not in DATASETS:
            raise unknown("data set", name, DATASETS)
        ds = DATASETS[name]
        if ds.kind != "instructions":
            raise ShearkitError(f"'{name}' is not an instruction set; instruction sets: "
                                f"{', '.join(k for k, v in DATASETS.items() if v.kind == 'instructions')}.")
        root = resolve_data_dir(data_dir)
        if root is None:
            raise ShearkitError(f"Instruction set '{name}' needs the local data directory: set ${DATA_ENV} or "
                                "pass --data-dir.")
        recs = read_records(root / ds.splits["train"][0])
    bad = [i for i, r in enumerate(recs) if not _is_instruction(r)]
    if bad or not recs:
        raise ShearkitError(f"Instruction data '{name}' must be a list of records with string fields 'instruction' "
                            "and 'output' (and optional 'input', and 'history': a list of [question, answer] "
                            f"strings); record {bad[0] if bad else 0} is not.")
    return recs


def _is_instruction(rec) -> bool:
    """True for an instruction record whose fields hold what `format_instruction` reads."""
    if not (isinstance(rec, dict) and isinstance(rec.get("instruction"), str) and isinstance(rec.get("output"), str)):
        return False
    history = rec.get("history")
    return (rec.get("input") is None or isinstance(rec["input"], str)) and (history is None or (
        isinstance(history, list) and all(isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t)
                                          for t in history)))
