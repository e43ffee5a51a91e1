"""Runs inside a process whose path puts compressed-tensors 0.13 (which still has the sparse
compressors) first, so our sparse layout is checked against that package's own code.

    python ct_legacy_worker.py decompress COMPRESSED_DIR OUT.safetensors
        compressed-tensors' ModelCompressor reads config.json and decompresses every weight.
    python ct_legacy_worker.py compress DENSE_DIR OUT_DIR FORMAT TARGETS_JSON
        compressed-tensors' own sparse compressor writes OUT_DIR, for shearkit to load back.
"""
import json
import shutil
import sys
from pathlib import Path

import compressed_tensors
from compressed_tensors.compressors import BaseCompressor, ModelCompressor
from compressed_tensors.config import SparsityCompressionConfig
from safetensors.torch import load_file, save_file


def decompress(src: str, out: str) -> None:
    mc = ModelCompressor.from_pretrained(src)
    assert mc is not None and mc.sparsity_compressor is not None, "no sparsity config recognised"
    dense = {k: v.contiguous() for k, v in mc.sparsity_compressor.decompress(src)}
    save_file(dense, out, metadata={"ct_version": compressed_tensors.__version__,
                                    "format": mc.sparsity_config.format})


def compress(src: str, out: str, fmt: str, targets_json: str) -> None:
    targets = json.loads(targets_json)
    sd = {}
    for f in sorted(Path(src).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    cfg = SparsityCompressionConfig.load_from_registry(fmt, targets=targets, ignore=[], sparsity_structure="unstructured")
    comp = BaseCompressor.load_from_registry(fmt, config=cfg)
    packed = comp.compress(sd, compression_targets=set(targets))
    outp = Path(out)
    outp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in packed.items()}, str(outp / "model.safetensors"))
    config = json.loads((Path(src) / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "version": compressed_tensors.__version__,
                                     "sparsity_config": cfg.model_dump()}
    (outp / "config.json").write_text(json.dumps(config))
    for extra in Path(src).glob("generation_config.json"):
        shutil.copy(extra, outp / extra.name)


if __name__ == "__main__":
    {"decompress": decompress, "compress": compress}[sys.argv[1]](*sys.argv[2:])
