"""Device and dtype names as users write them (--device, --dtype) -> torch.device / torch.dtype.

"auto" means one thing everywhere: the first CUDA device when one is visible, else the CPU;
and on that device the trainer's compute dtype, bfloat16 on CUDA and float32 on CPU, which
an engine must run in for its log-probs to equal the trainer's bitwise.
"""

from __future__ import annotations

import re

import torch

from miles_fsdp.errors import UserError

DTYPES = {
    "bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16,
    "bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16,
}
DEVICE_NAMES = "'auto', 'cpu', 'cuda' or 'cuda:N'"


class DeviceError(UserError, ValueError):
    """A device name that is malformed or names a device this machine does not have."""


def check_device(name: str, field: str) -> None:
    """Refuse a name other than DEVICE_NAMES; the message names `field` (a flag or config field)."""
    if not re.fullmatch(r"auto|(cpu|cuda)(:\d+)?", name):
        raise DeviceError(f"{field}={name!r}: expected {DEVICE_NAMES}")


def resolve_device(name: str, field: str = "--device") -> torch.device:
    """The torch.device `name` stands for; a CUDA device this machine lacks is a DeviceError."""
    check_device(name, field)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DeviceError(f"{field}={name!r}: this machine has {torch.cuda.device_count()} visible CUDA "
                          f"device(s); pass {field} cpu or auto")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """DTYPES[name]; "auto" is the trainer's compute dtype on `device` (bfloat16 on CUDA, else float32)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]
