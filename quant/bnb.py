"""bitsandbytes, imported without going on the network.

bitsandbytes 0.50 on a CPU with avx512_bf16 (Sapphire Rapids and later) runs, at import time,
`from kernels import get_kernel; get_kernel("kernels-community/quantization-bitsandbytes")`
(`bitsandbytes/backends/cpu/ops.py`): with the `kernels` package installed (transformers brings
it), that asks the Hugging Face hub for a kernel (DNS lookups of huggingface.co were seen), and
then logs a warning with "trust_remote_code" advice. Neither bitsandbytes nor `kernels` has a
setting that turns the lookup off (`kernels` honours HF_HUB_OFFLINE only as read when
huggingface_hub was first imported, and the app may have imported it for a download).

The lookup only ever serves bnb's packed avx512_bf16 CPU kernel, which this project never calls:
on CPU the 4-bit layers run on the native kernel (`mixtral_chat.quant.native`) or on bnb's
`matmul_4bit` with an unpacked quant state, whose op has a local implementation. So `kernels` is
hidden from that one import (an import of a `None` entry in `sys.modules` raises ImportError,
which bnb catches), and bnb's warning about it is kept out of the user's terminal.

Every import of bitsandbytes in the project goes through `bitsandbytes()` / `bnb_functional()`.
"""

from __future__ import annotations

import importlib
import logging
import sys
from types import ModuleType

# The logger bitsandbytes warns on when the kernel-hub lookup fails.
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


def bitsandbytes() -> ModuleType:
    """The `bitsandbytes` module, imported (once) with the kernel hub out of reach."""
    module = sys.modules.get("bitsandbytes")
    if module is not None:
        return module
    logger = logging.getLogger(_BNB_CPU_LOGGER)
    saved_level = logger.level
    hidden = sys.modules.get("kernels", _MISSING)
    sys.modules["kernels"] = None  # type: ignore[assignment]  # `from kernels import ...` -> ImportError
    logger.setLevel(logging.ERROR)
    try:
        return importlib.import_module("bitsandbytes")
    finally:
        logger.setLevel(saved_level)
        if hidden is _MISSING:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = hidden


def bnb_functional() -> ModuleType:
    """`bitsandbytes.functional`, through `bitsandbytes()`."""
    bitsandbytes()
    return importlib.import_module("bitsandbytes.functional")


_MISSING = object()
