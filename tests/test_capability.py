"""Pre-Ampere GPUs (defect 5): dtype and scheme from the compute capability alone."""

from __future__ import annotations

import pytest

from mixtral_chat.engine.capability import gpu_support
from mixtral_chat.engine.errors import MixtralChatError


@pytest.mark.parametrize(
    ("capability", "dtype", "int4"),
    [
        ((6, 1), "float16", False),  # Pascal (GTX 10xx)
        ((7, 0), "float16", False),  # Volta (V100)
        ((7, 5), "float16", False),  # Turing (RTX 20xx)
        ((8, 0), "bfloat16", True),  # A100
        ((8, 6), "bfloat16", True),  # RTX 30xx
        ((8, 9), "bfloat16", True),  # RTX 40xx
        ((9, 0), "bfloat16", True),  # H100
        ((12, 0), "bfloat16", True),  # RTX 50xx
    ],
)
def test_dtype_and_int4_follow_the_capability(capability: tuple[int, int], dtype: str, int4: bool) -> None:
    support = gpu_support(*capability)
    assert (support.dtype, support.int4) == (dtype, int4)
    assert support.scheme_for("int4") == ("int4" if int4 else "nf4")
    assert support.scheme_for("nf4") == "nf4" and support.scheme_for(None) is None


def test_an_int4_directory_on_turing_says_what_to_do() -> None:
    with pytest.raises(
        MixtralChatError, match=r"needs compute capability 8\.0 .*this GPU is 7\.5.*--scheme nf4"
    ):
        gpu_support(7, 5).check_stored_scheme("int4", "/models/m")
    gpu_support(7, 5).check_stored_scheme("nf4", "/models/m")  # runs
    gpu_support(8, 6).check_stored_scheme("int4", "/models/m")


def test_a_gpu_older_than_pascal_is_refused() -> None:
    with pytest.raises(MixtralChatError, match=r"5\.2 is too old"):
        gpu_support(5, 2)
