"""Models larger than memory: decoder blocks stay in their safetensors files until a block is needed.

`load_lazy` builds the model on the meta device (accelerate's `init_empty_weights`), loads the stem
(embeddings, final norm, output head) and leaves every decoder block empty. Each block carries
accelerate's offload hook (`AlignDevicesHook` over an `OffloadedWeightsLoader` that reads the
safetensors files), so a whole-model forward (perplexity, zero-shot, generation) loads one block,
runs it and frees it again. Methods that change a block (the blockwise pruners, structured cuts) take
it with `loaded_block(model, block, write=True)`: the block is loaded, changed (or sliced), written to
a shard of its own in a work folder, and the loader is pointed at that shard, so every later read sees
the pruned block and the input model's files are never touched. `save_weights` streams the model to a
sharded checkpoint block by block. Peak memory: the stem, one block and the calibration activations.

What needs the whole model at once (training, gradients) refuses a lazy model (`require_materialized`).
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from ..errors import ShearkitError

ATTR = "_shearkit_lazy"
SOURCE = "_shearkit_source_prefix"  # on each block: where its tensors live in the loader's index


def lazy_weights(model) -> "LazyWeights | None":
    """The lazy store of a model loaded with `load_lazy` (None for an ordinary model)."""
    from ..arch.modules import unwrap

    return getattr(unwrap(model), ATTR, None)


def is_lazy(model) -> bool:
    """True when the model's decoder blocks are loaded from disk on demand."""
    return lazy_weights(model) is not None


def require_materialized(model, what: str) -> None:
    """Refuse `what` on a lazy model, naming what works instead."""
    if is_lazy(model):
        from ..methods import METHODS, get_method

        ok = [m for m in METHODS if get_method(m).lazy_ok]
        raise ShearkitError(f"{what} needs the whole model in memory, and this model was loaded block by block "
                            f"(--lazy or --max-memory). A lazy model can be pruned with {', '.join(sorted(ok))}, evaluated "
                            "and saved; load the model whole (no --lazy, or a larger --max-memory) for this.")


def _libc():
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC = lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else False
        except OSError:
            _LIBC = False
    return _LIBC


_LIBC = None
M_MMAP_THRESHOLD = -3


def release_freed_memory() -> None:
    """Give the memory of freed tensors back to the system (glibc's `malloc_trim`; nothing elsewhere)."""
    if _libc():
        _libc().malloc_trim(0)


def keep_large_allocations_mapped(threshold: int = 1 << 20) -> None:
    """Serve every allocation of `threshold` bytes or more from its own mapping, returned when freed (glibc).

    glibc raises its mmap threshold each time a large block is freed, so the next block's tensors come
    from the heap and, once freed, stay in the process: a lazy walk then grows by about a block per block
    (measured: 88 MB for an 8-block, 100 MB model). Fixing the threshold keeps a lazy model's memory at
    about the block in use; it is set when a model is loaded lazily, for the rest of the process."""
    if _libc():
        _libc().mallopt(M_MMAP_THRESHOLD, threshold)


_OFFLOAD_HOOK = None


def _offload_hook_class() -> type:
    """accelerate's offload hook that also gives the freed block's memory back after each forward."""
    global _OFFLOAD_HOOK
    if _OFFLOAD_HOOK is None:
        from accelerate.hooks import AlignDevicesHook

        class OffloadHook(AlignDevicesHook):
            def post_forward(self, module, output):
                output = super().post_forward(module, output)
                release_freed_memory()
                return output

        _OFFLOAD_HOOK = OffloadHook
    return _OFFLOAD_HOOK


def _tensor_names(module: nn.Module) -> list[str]:
    """Parameters and persistent buffers of `module`, as its state dict names them."""
    return list(module.state_dict(keep_vars=True).keys())


class LazyWeights:
    """Where each decoder block's tensors are (the input files, or a pruned block's own shard) and how to
    load a block for a while (`loaded`) or for one forward (accelerate's hook)."""

    def __init__(self, model: nn.Module, loader, layers_name: str, device: torch.device, work_dir: Path,
                 owns_work_dir: bool):
        self.loader = loader  # accelerate OffloadedWeightsLoader: name -> safetensors file, weight name, dtype
        self.layers_name = layers_name
        self.device = device
        self.work_dir = work_dir
        self._count = itertools.count()
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(work_dir), True) if owns_work_dir else None
        self._model = weakref.ref(model)

    # -- one block --------------------------------------------------------------------------
    @staticmethod
    def source(block: nn.Module) -> str:
        return getattr(block, SOURCE)

    def attach(self, block: nn.Module) -> None:
        """Give `block` accelerate's offload hook: each forward loads it from the loader and frees it after."""
        from accelerate.hooks import add_hook_to_module
        from accelerate.utils import PrefixedDataset

        hook = _offload_hook_class()(execution_device=self.device, offload=True, place_submodules=True,
                           weights_map=PrefixedDataset(self.loader, self.source(block)))
        add_hook_to_module(block, hook)

    def block_state(self, block: nn.Module) -> dict[str, torch.Tensor]:
        """The block's tensors, read from where they are now (named inside the block)."""
        prefix = self.source(block)
        return {name: self.loader[prefix + name] for name in _tensor_names(block)}

    @contextmanager
    def loaded(self, block: nn.Module, write: bool = False, device: torch.device | None = None) -> Iterator[nn.Module]:
        """`block` with its weights in memory on `device` (default: the compute device) for the duration;
        with `write`, what it holds afterwards is written to a shard of its own and read from there on."""
        from accelerate.hooks import remove_hook_from_module
        from accelerate.utils import set_module_tensor_to_device

        remove_hook_from_module(block)
        dev = device or self.device
        try:
            for name, value in self.block_state(block).items():
                set_module_tensor_to_device(block, name, dev, value=value)
            yield block
            if write:
                self._write(block)
        finally:
            for name in _tensor_names(block):
                set_module_tensor_to_device(block, name, "meta")
            self.attach(block)
            release_freed_memory()

    def _write(self, block: nn.Module) -> None:
        from safetensors.torch import save_file

        prefix = self.source(block)
        old = {self.loader.index[prefix + n]["safetensors_file"] for n in _tensor_names(block)}
        state = {n: t.detach().to("cpu").contiguous() for n, t in block.state_dict().items()}
        shard = self.work_dir / f"block-{next(self._count):06d}.safetensors"
        save_file(state, str(shard))
        for n, t in state.items():
            self.loader.index[prefix + n] = {"safetensors_file": str(shard), "weight_name": n,
                                             "dtype": str(t.dtype).replace("torch.", "")}
        for f in old:  # a shard this store wrote earlier for the block is not read again
            if Path(f).parent == self.work_dir:
                Path(f).unlink(missing_ok=True)

    # -- the whole model ------------------------------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        from ..arch import get_adapter

        return list(get_adapter(self._model()).layers)

    def named_state(self, model: nn.Module) -> Iterator[tuple[str, Any]]:
        """(name, tensor-or-loader) for every tensor of the model as it is now: blocks under their current
        index, read one at a time (call the second item to read a block tensor)."""
        inside = set()
        for i, block in enumerate(self.blocks()):
            prefix = self.source(block)
            for name in _tensor_names(block):
                key = f"{self.layers_name}.{i}.{name}"
                inside.add(key)
                yield key, (lambda k=prefix + name: self.loader[k])
        for name, t in model.state_dict(keep_vars=True).items():
            if name not in inside and not name.startswith(self.layers_name + "."):
                yield name, t

    def state(self, model: nn.Module) -> "LazyState":
        return LazyState(dict(self.named_state(model)))


class LazyState(Mapping):
    """A state dict whose block tensors are read when asked for (one at a time: the memory of the tensor
    read before is given back first, so reading every tensor in turn holds about one)."""

    def __init__(self, items: dict[str, Any]):
        self._items = items

    def __getitem__(self, key: str) -> torch.Tensor:
        v = self._items[key]
        if not callable(v):
            return v
        release_freed_memory()
        return v()

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def _index(path: Path, dtype: torch.dtype) -> dict[str, dict[str, str]]:
    """The loader index of a model directory's weights: name -> safetensors file and name (and dtype)."""
    from safetensors import safe_open

    from .weights import check_weight_files

    index: dict[str, dict[str, str]] = {}
    for file in check_weight_files(path):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                index[key] = {"safetensors_file": str(file), "weight_name": key,
                              "dtype": str(dtype).replace("torch.", "")}
    return index


def load_lazy(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              work_dir: str | os.PathLike | None = None):
    """A causal LM from a model directory of safetensors with its decoder blocks left on disk.

    `work_dir`: where changed blocks are written (default: a temporary folder removed with the model).
    Only plain transformers directories (vanilla widths, no shared blocks, not compressed) load this way."""
    from accelerate import init_empty_weights
    from accelerate.utils import OffloadedWeightsLoader, set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..arch import get_adapter
    from .modeling import needs_modeling_file
    from .sparse_export import is_compressed
    from .weights import read_config

    path = Path(path)
    keep_large_allocations_mapped()
    raw = read_config(path)
    if is_compressed(raw) or needs_modeling_file(raw):
        raise ShearkitError(f"{path} is a compressed or per-layer / shared-block model; lazy loading (--lazy, "
                            "--max-memory) takes plain transformers model directories. Load it whole.")
    index = _index(path, dtype)
    if not index:
        raise ShearkitError(f"{path} holds no .safetensors weights; lazy loading reads safetensors files.")
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)  # plain transformers folders only
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    ad = get_adapter(model)
    layers_name = next(n for n, m in model.named_modules() if m is ad.layers)
    dev = torch.device(device)
    owns = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="shearkit-lazy-")) if owns else Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    loader = OffloadedWeightsLoader(index=index)
    store = LazyWeights(model, loader, layers_name, dev, work, owns)
    for i, block in enumerate(ad.layers):
        setattr(block, SOURCE, f"{layers_name}.{i}.")
    stem = [n for n in _tensor_names(model) if not n.startswith(layers_name + ".")]
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    missing = []
    for name in stem:
        if name in index:
            set_module_tensor_to_device(model, name, dev, value=loader[name])
        elif not tied:
            missing.append(name)
    if tied:
        model.tie_weights()
    meta = [n for n, t in model.state_dict(keep_vars=True).items()
            if t.is_meta and not n.startswith(layers_name + ".")]
    if missing or meta:
        raise ShearkitError(f"{path} lacks weights the model needs ({', '.join((missing or meta)[:5])}); re-save or "
                            "re-download the model.")
    for block in ad.layers:
        prefix = store.source(block)
        absent = [n for n in _tensor_names(block) if prefix + n not in index]
        if absent:
            raise ShearkitError(f"{path} lacks weights of block {prefix[:-1]} ({', '.join(absent[:5])}); re-save or "
                                "re-download the model.")
        store.attach(block)
    model.config.name_or_path = str(path)
    setattr(model, ATTR, store)
    return model.eval()


def save_weights(model: nn.Module, folder: Path) -> None:
    """Write a lazy model's weights into `folder` as a sharded safetensors checkpoint, one shard for the
    stem and one per block, read and written one block at a time (`model.safetensors.index.json`)."""
    from safetensors.torch import save_file

    from .weights import WEIGHTS_INDEX

    store = lazy_weights(model)
    blocks = store.blocks()
    n = len(blocks) + 1
    name = lambda k: f"model-{k:05d}-of-{n:05d}.safetensors"  # noqa: E731
    weight_map: dict[str, str] = {}
    total = 0
    seen: set[int] = set()
    stem = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if key.startswith(store.layers_name + ".") or t.data_ptr() in seen:
            continue  # a tied output head is the embedding: stored once, as transformers does
        seen.add(t.data_ptr())
        stem[key] = t.detach().to("cpu").contiguous()
    save_file(stem, str(folder / name(1)), metadata={"format": "pt"})
    for key, t in stem.items():
        weight_map[key], total = name(1), total + t.numel() * t.element_size()
    del stem
    for i, block in enumerate(blocks):
        state = {f"{store.layers_name}.{i}.{k}": v.contiguous() for k, v in store.block_state(block).items()}
        save_file(state, str(folder / name(i + 2)), metadata={"format": "pt"})
        for key, t in state.items():
            weight_map[key], total = name(i + 2), total + t.numel() * t.element_size()
        del state
        release_freed_memory()
    (folder / WEIGHTS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2, sort_keys=True))


@contextmanager
def loaded_block(model: nn.Module, block: nn.Module, device: torch.device | None = None,
                 write: bool = False) -> Iterator[nn.Module]:
    """`block` in memory on `device` for the duration, whatever the model: an ordinary block is moved there
    and back; a lazy model's block is loaded from disk (and, with `write`, its changes kept: `LazyWeights.loaded`)."""
    store = lazy_weights(model)
    if store is not None:
        with store.loaded(block, write=write, device=device) as b:
            yield b
        return
    home = next((p.device for p in block.parameters()), torch.device("cpu"))
    if device is not None:
        block.to(device)
    try:
        yield block
    finally:
        block.to(home)


def parse_memory(value: str | int) -> int:
    """Bytes from an int or a size such as "8GB" / "500MiB" (accelerate's notation)."""
    from accelerate.utils import convert_file_size_to_int

    try:
        n = int(value) if isinstance(value, str) and value.strip().isdigit() else convert_file_size_to_int(value)
    except (ValueError, TypeError):
        n = -1
    if not isinstance(n, int) or n <= 0:
        raise ShearkitError(f"--max-memory must be a positive size such as 8GB or 500MiB, got {value!r}.")
    return n


def weight_bytes(path: str | os.PathLike, dtype: torch.dtype) -> tuple[int, int, int]:
    """(whole model, stem, largest decoder block) in bytes at `dtype`, from the config alone (a meta model)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..arch import get_adapter

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, trust_remote_code=False), dtype=dtype,
                                                 trust_remote_code=False)
    size = lambda m: sum(p.numel() for p in {id(p): p for p in m.parameters()}.values()) * dtype.itemsize  # noqa: E731
    blocks = get_adapter(model).layers
    whole = size(model)
    return whole, whole - size(blocks), max((size(b) for b in blocks), default=0)


def needs_lazy(path: str | os.PathLike, dtype: torch.dtype, max_memory: str | int | None) -> bool:
    """Whether a model must be loaded lazily to keep its weights within `max_memory`: False when the whole
    model fits; True when the stem and two blocks (the one in use and the one being read) fit; else refused."""
    if max_memory is None:
        return False
    cap = parse_memory(max_memory)
    whole, stem, block = weight_bytes(path, dtype)
    if whole <= cap:
        return False
    if stem + 2 * block <= cap:
        return True
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    raise ShearkitError(f"--max-memory {max_memory} ({gib(cap)}) is too small for {path}: the whole model takes "
                        f"{gib(whole)}, and even block by block it needs {gib(stem + 2 * block)} (embeddings and output "
                        f"head {gib(stem)}, two blocks of {gib(block)}). Raise --max-memory to at least "
                        f"{gib(stem + 2 * block)}, or use a smaller --dtype.")
