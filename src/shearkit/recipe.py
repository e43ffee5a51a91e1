"""YAML recipes: every knob of a run, in sections whose keys are config dataclass fields.

```yaml
model: {name: smollm2-135m, device: auto, dtype: auto}
calib: {dataset: c4, samples: 64, seqlen: 512, seed: 0}
prune: {method: llm-pruner, ratio: 0.2}        # keys after `method` are that method's config
recover: {steps: 200, data: alpaca}
eval: {tasks: [wikitext2, ptb], seqlen: 512, limit: 40}
```
CLI flags and `--set section.key=value` override the file; the resolved recipe is written to
the run directory. Unknown sections and keys are errors that suggest the closest valid name.

A recipe file may come from elsewhere, so it cannot make shearkit write outside the working
directory or run a model's own code: its `out` must stay inside the working directory, and the
keys in `COMMAND_LINE_ONLY` count only when the command line gives them (a flag or `--set`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import ShearkitError, did_you_mean


@dataclass
class ModelConfig:
    """Which model to load and where it runs."""

    name: str = "smollm2-135m"  # built-in name, local dir, .gguf file, or hub id
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16
    cache_dir: str | None = None
    trust_remote_code: bool = False
    # models larger than memory: decoder blocks stay on disk, loaded one at a time (the methods without
    # gradients or training; evaluation, saving); max_memory: lazy only when the weights exceed it
    lazy: bool = False
    max_memory: str | None = None  # e.g. 8GB, 500MiB

    def __post_init__(self):
        if self.max_memory is not None:
            from .io.lazy import parse_memory

            parse_memory(self.max_memory)

    def load_options(self) -> dict:
        """The keyword arguments of `shearkit.load` this section sets."""
        return {"device": self.device, "dtype": self.dtype, "cache_dir": self.cache_dir,
                "trust_remote_code": self.trust_remote_code, "lazy": self.lazy, "max_memory": self.max_memory}


@dataclass
class CalibConfig:
    """Calibration data: `samples` seeded random windows of `seqlen` tokens from `dataset`."""

    dataset: str = "c4"
    samples: int = 64  # the papers use 128 x 2048; the local C4 holds ~250k tokens
    seqlen: int = 512
    seed: int = 0
    data_dir: str | None = None

    def __post_init__(self):
        if self.samples < 1 or self.seqlen < 2:
            raise ShearkitError(f"calib.samples must be >= 1 and calib.seqlen >= 2 (got {self.samples}, {self.seqlen}).")


@dataclass
class EvalConfig:
    """What to evaluate: perplexity sets (`wikitext2`, `ptb`) and zero-shot task names."""

    tasks: list[str] = field(default_factory=lambda: ["wikitext2"])
    seqlen: int = 2048
    limit: int | None = None  # first N windows (perplexity) or N examples (zero-shot)
    # windows (requests) per forward pass; auto: 1 on the CPU, on an accelerator the largest that fits
    batch_size: int | str = "auto"
    split: str | None = None
    data_dir: str | None = None

    def __post_init__(self):
        if isinstance(self.tasks, str):
            self.tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
        if not self.tasks:
            raise ShearkitError("eval.tasks is empty; name at least one task, e.g. --tasks wikitext2.")
        if self.limit is not None and self.limit < 1:
            raise ShearkitError(f"--limit must be a positive integer, got {self.limit}.")
        if self.seqlen < 2:
            raise ShearkitError(f"--seqlen must be at least 2, got {self.seqlen}.")
        if isinstance(self.batch_size, str):
            if self.batch_size.strip().lower() != "auto":
                raise ShearkitError(f"--batch-size must be a whole number of windows or 'auto', got "
                                    f"'{self.batch_size}'.")
            self.batch_size = "auto"
        elif self.batch_size < 1:
            raise ShearkitError(f"--batch-size must be at least 1, got {self.batch_size}.")


# Sections whose config class depends on their content (prune: the method) or that later
# subsystems provide register a resolver here: section name -> callable(dict) -> dataclass.
SECTION_RESOLVERS: dict[str, Callable[[dict], Any]] = {}
STATIC_SECTIONS: dict[str, type] = {"model": ModelConfig, "calib": CalibConfig, "eval": EvalConfig}
TOP_LEVEL_KEYS = {"seed": int, "out": str, "name": str, "save_format": str, "eval_dense": bool}
# keys a recipe file may not set (to anything but null/false): what they do, and how to give them instead
COMMAND_LINE_ONLY: dict[str, tuple[str, str]] = {
    "model.cache_dir": ("writes the model cache outside the run directory",
                        "--cache-dir PATH (or --set model.cache_dir=PATH)"),
    "model.trust_remote_code": ("runs Python code from the model's files",
                                "--trust-remote-code (or --set model.trust_remote_code=true)"),
    "prune.resume_dir": ("writes checkpoints outside the run directory", "--set prune.resume_dir=PATH"),
}


def register_section(name: str, resolver: Callable[[dict], Any]) -> None:
    """Let a subsystem (pruning methods, recovery) own a recipe section."""
    SECTION_RESOLVERS[name] = resolver


def section_names() -> list[str]:
    _load_section_owners()
    return sorted([*STATIC_SECTIONS, *SECTION_RESOLVERS])


def _load_section_owners() -> None:
    # importing these registers their sections; they are optional while being built
    import importlib

    for mod in ("shearkit.methods", "shearkit.recovery", "shearkit.extension"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def build_config(cls: type, data: dict | None, where: str) -> Any:
    """Instantiate dataclass `cls` from `data`, refusing unknown keys and mistyped values."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if not isinstance(key, str):
            raise ShearkitError(f"Key {key!r} in '{where}' is not a name; valid keys of '{where}': {', '.join(fields)}.")
        if key not in fields:
            raise ShearkitError(f"Unknown key '{where}.{key}'.{did_you_mean(key, fields)} "
                                f"Valid keys of '{where}': {', '.join(fields)}.")
    hints = typing.get_type_hints(cls)
    kwargs = {k: coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, with an error that names the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, where)
            except ShearkitError as e:
                errors.append(str(e))
        raise ShearkitError(errors[0] if errors else f"Bad value for {where}: {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ShearkitError(f"{where} must be a list, got {value!r}.")
        inner = args[0] if args else Any
        return [coerce(v, inner, where) for v in value]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ShearkitError(f"{where} must be a mapping, got {value!r}.")
        return value
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ShearkitError(f"{where} must be true or false, got {value!r}.")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ShearkitError(f"{where} must be a number, got {value!r}.")
        try:
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            number = hint(value) if not isinstance(value, str) else hint(float(value) if hint is float else int(value))
            if hint is float and not math.isfinite(number):  # NaN passes every range check: refuse it here
                raise ValueError
            return number
        except (TypeError, ValueError, OverflowError):
            raise ShearkitError(f"{where} must be {'an integer' if hint is int else 'a finite number'}, "
                                f"got {value!r}.") from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ShearkitError(f"{where} must be a string, got {value!r}.")
        return str(value)
    return value


@dataclass
class Recipe:
    """A resolved recipe: one config object per section present."""

    sections: dict[str, Any] = field(default_factory=dict)
    top: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str, default: Any = None) -> Any:
        return self.sections.get(name, default)

    @property
    def model(self) -> ModelConfig:
        return self.sections.setdefault("model", ModelConfig())

    @property
    def eval(self) -> EvalConfig:
        return self.sections.setdefault("eval", EvalConfig())

    @property
    def calib(self) -> CalibConfig:
        return self.sections.setdefault("calib", CalibConfig())

    def out_dir(self, cli_out: str | os.PathLike | None) -> str | os.PathLike | None:
        """The run directory: `cli_out` (--out) as given, else the recipe's `out`, which must stay inside
        the working directory (None: the command's default)."""
        if cli_out:
            return cli_out
        out = self.top.get("out")
        if out and "\x00" in out:
            raise ShearkitError(f"The recipe's out: {out!r} holds a NUL character, which no folder name can; "
                                "give a plain folder name.")
        if out and not inside_working_dir(out):
            raise ShearkitError(f"The recipe's out: {out!r} is outside the working directory; a recipe may only "
                                "name a run directory inside it (a relative path that '..' does not lead out of). "
                                f"Remove it from the recipe and give it on the command line instead: --out {out}")
        return out or None

    def seeds(self) -> dict[str, int]:
        """Every seed the recipe sets, by where: `seed` (top level), `calib.seed`, `prune.seed`, ..."""
        out = {"seed": self.top["seed"]} if self.top.get("seed") is not None else {}
        out.update({f"{name}.seed": cfg.seed for name, cfg in self.sections.items()
                    if isinstance(getattr(cfg, "seed", None), int)})
        return out

    def to_dict(self) -> dict:
        out: dict[str, Any] = dict(self.top)
        for k, v in self.sections.items():
            out[k] = v.to_dict() if hasattr(v, "to_dict") else dataclasses.asdict(v)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def parse_recipe(data: dict | None, overrides: list[str] | None = None) -> Recipe:
    """Validate a recipe mapping (plus `section.key=value` overrides) into config objects."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (data or {}).items()}
    for item in overrides or []:
        apply_override(data, item)
    _load_section_owners()
    valid = [*STATIC_SECTIONS, *SECTION_RESOLVERS, *TOP_LEVEL_KEYS]
    recipe = Recipe()
    for key, value in data.items():
        if not isinstance(key, str):
            raise ShearkitError(f"Recipe key {key!r} is not a name; valid sections: {', '.join(sorted(valid))}.")
        if key in TOP_LEVEL_KEYS:
            recipe.top[key] = coerce(value, TOP_LEVEL_KEYS[key], key)
        elif key in STATIC_SECTIONS:
            if value is not None and not isinstance(value, dict):
                raise ShearkitError(f"Recipe section '{key}' must be a mapping of keys to values.")
            recipe.sections[key] = build_config(STATIC_SECTIONS[key], value, key)
        elif key in SECTION_RESOLVERS:
            if value is not None and not isinstance(value, dict):
                raise ShearkitError(f"Recipe section '{key}' must be a mapping of keys to values.")
            recipe.sections[key] = SECTION_RESOLVERS[key](value or {})
        else:
            raise ShearkitError(f"Unknown recipe section '{key}'.{did_you_mean(key, valid)} "
                                f"Valid sections: {', '.join(sorted(valid))}.")
    return recipe


def apply_override(data: dict, item: str) -> None:
    """Apply one `section.key=value` override (value parsed as YAML) to a recipe mapping; a dotted key
    reaches into a nested mapping (`prune.train.steps=64`)."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ShearkitError(f"--set expects section.key=value (e.g. eval.seqlen=512), got '{item}'.")
    path, raw = item.split("=", 1)
    *parents, key = path.split(".")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except (yaml.YAMLError, RecursionError) as e:
        raise ShearkitError(f"--set {path}: the value {raw!r} is not valid YAML ({str(e).splitlines()[0]}); "
                            "quote it to give a string, e.g. --set 'eval.tasks=\"a,b\"'.") from None
    node = data
    for depth, name in enumerate(parents):
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            where = ".".join(parents[: depth + 1])
            raise ShearkitError(f"Cannot set '{path}': '{where}' is not a section or a mapping.")
    node[key] = value


BUILTIN_RECIPES = Path(__file__).parent / "recipes"


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped with shearkit (usable as `shearkit run NAME`)."""
    return sorted(p.stem for p in BUILTIN_RECIPES.glob("*.yaml"))


def resolve_recipe_path(path: str | Path) -> Path:
    """A recipe file path, or the shipped recipe of that name (`quick`, `wanda`, ...)."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = BUILTIN_RECIPES / f"{p.name.removesuffix('.yaml')}.yaml"
    if p.parent == Path(".") and shipped.is_file():
        return shipped
    raise ShearkitError(f"Recipe file not found: {p}. Shipped recipes: {', '.join(builtin_recipes())}"
                        f"{did_you_mean(p.stem, builtin_recipes())}")


def inside_working_dir(path: str) -> bool:
    """True for a relative path that stays inside the working directory (symbolic links followed)."""
    p = Path(path)
    if str(path).startswith("~") or p.is_absolute():
        return False
    cwd = Path.cwd().resolve()
    return (cwd / p).resolve().is_relative_to(cwd)


def given_keys(extra: dict | None, overrides: list[str] | None) -> set[str]:
    """The `section.key` names the command line sets: flags (`extra` values not None) and `--set`."""
    keys = {f"{section}.{k}" for section, values in (extra or {}).items() if isinstance(values, dict)
            for k, v in values.items() if v is not None}
    return keys | {item.split("=", 1)[0] for item in overrides or []}


def check_file_keys(data: dict, source: Path, given: set[str]) -> None:
    """Refuse a recipe file's `COMMAND_LINE_ONLY` values that the command line does not set itself."""
    for key, (effect, option) in COMMAND_LINE_ONLY.items():
        section, name = key.split(".")
        values = data.get(section)
        value = values.get(name) if isinstance(values, dict) else None
        if value and key not in given:
            raise ShearkitError(f"Recipe {source} sets {key}: {value!r}, which {effect}; a recipe file may not. Remove "
                                f"it from the recipe and give it on the command line instead: {option}.")


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None,
                extra: dict | None = None) -> Recipe:
    """Read a YAML recipe (optional), merge `extra` section values (from CLI flags) and overrides."""
    data: dict = {}
    if path is not None:
        p = resolve_recipe_path(path)
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ShearkitError(f"Recipe {p} is not UTF-8 text ({e}); save it as UTF-8.") from None
        except (yaml.YAMLError, RecursionError) as e:  # RecursionError: nested too deeply to read
            raise ShearkitError(f"Recipe {p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ShearkitError(f"Recipe {p} must be a mapping of sections (model, calib, prune, recover, eval).")
        check_file_keys(data, p, given_keys(extra, overrides))
    for section, values in (extra or {}).items():
        if isinstance(values, dict):
            target = data.get(section)
            if target is None:
                target = data[section] = {}
            elif not isinstance(target, dict):
                continue  # the recipe's section is not a mapping: parse_recipe says so
            target.update({k: v for k, v in values.items() if v is not None})
        elif values is not None:
            data[section] = values
    return parse_recipe(data, overrides)
