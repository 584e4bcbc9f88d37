"""What a CUDA GPU can run, from its compute capability alone (pure: no torch, tested on CPU).

Ampere (sm80) and newer: bfloat16 and tinygemm's int4 kernel. Turing and Volta (RTX 20xx, V100:
still 8-24 GB cards) have neither: float16 compute and nf4 (bitsandbytes' kernels run there).
Pascal runs float16 too, without tensor cores; anything older is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixtral_chat.engine.errors import MixtralChatError

AMPERE = (8, 0)
OLDEST = (6, 0)


@dataclass(frozen=True)
class GpuSupport:
    capability: tuple[int, int]
    dtype: str  # the compute dtype: "bfloat16" or "float16"
    int4: bool  # tinygemm int4 runs
    scheme: str  # the 4-bit scheme for a model quantized on load

    def scheme_for(self, asked: str | None) -> str | None:
        """The scheme to quantize with on load: int4 becomes nf4 where int4 cannot run."""
        return "nf4" if asked == "int4" and not self.int4 else asked

    def check_stored_scheme(self, scheme: str | None, where: str) -> None:
        """A directory quantized with int4 cannot run on this GPU: one line saying what to do."""
        if scheme == "int4" and not self.int4:
            major, minor = self.capability
            raise MixtralChatError(
                f"{where} is int4, which needs compute capability {AMPERE[0]}.{AMPERE[1]} (Ampere) or "
                f"newer; this GPU is {major}.{minor}: run it with --device cpu, or quantize it again with "
                "--scheme nf4"
            )


def gpu_support(major: int, minor: int) -> GpuSupport:
    capability = (major, minor)
    if capability < OLDEST:
        raise MixtralChatError(
            f"this GPU's compute capability {major}.{minor} is too old (at least {OLDEST[0]}.{OLDEST[1]}); "
            "use --device cpu"
        )
    ampere = capability >= AMPERE
    return GpuSupport(capability, "bfloat16" if ampere else "float16", ampere, "nf4")
