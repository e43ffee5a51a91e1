"""Run-time choice of device and dtype (`auto` picks CUDA when present)."""
from __future__ import annotations

from .errors import ShearkitError

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_device(device: str = "auto") -> str:
    """Map 'auto' to 'cuda' when a GPU is visible, else 'cpu'; validate explicit choices."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise ShearkitError(f"--device must be one of {', '.join(DEVICES)} (or cuda:N), got '{device}'.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ShearkitError("--device cuda was asked for but no CUDA device is visible; use --device cpu or auto.")
    if device.startswith("cuda:"):
        index, count = device.split(":", 1)[1], torch.cuda.device_count()
        if not index.isdigit() or int(index) >= count:
            raise ShearkitError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to "
                                f"cuda:{count - 1}; choose one of them, or --device cuda for the first.")
    return device


def resolve_dtype(dtype: str = "auto", device: str = "cpu"):
    """Map a dtype name to a torch dtype; 'auto' is float32 on CPU and bfloat16 on CUDA when the GPU
    supports it natively (else float16)."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if _native_bf16() else torch.float16
        return torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ShearkitError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'.")
    return table[dtype]


def _native_bf16() -> bool:
    """Whether the GPU computes in bfloat16 natively (Ampere and later): torch's default check also
    counts GPUs that only emulate it (slowly), where float16 is the better choice."""
    import torch

    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch without the argument counts native support only
        return torch.cuda.is_bf16_supported()
