"""`quant_config.json`: what a quantized model directory holds and how it was made.

{
  "format": "mixtral-chat-quantized", "format_version": 1,
  "scheme": "int4" | "nf4" | "none", "group_size": 64, "double_quant": false,
  "float_dtype": null,                      # `none` only: dtype of the stored linears
  "quantized": "...",                       # which tensors, in words
  "expert_layout": {...},                   # see mixtral_chat.quant.blob (null: no experts)
  "source": {"path": ..., "config_sha256": ..., "index_sha256": ...,
             "files": {"model-00001-of-00019.safetensors": 4892835432, ...},
             "total_bytes": ...},
  "libraries": {"torch": ..., "bitsandbytes": ..., "safetensors": ..., "mixtral-chat": ...},
  "created": "2025-01-01T00:00:00Z"
}
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixtral_chat.engine.checkpoint import QUANT_CONFIG_FILE
from mixtral_chat.engine.errors import QuantizationError
from mixtral_chat.engine.fileio import write_json_atomic
from mixtral_chat.quant.blob import ExpertBlobLayout
from mixtral_chat.quant.common import dtype_from_name
from mixtral_chat.quant.schemes import QuantScheme, get_scheme

FORMAT_NAME = "mixtral-chat-quantized"
FORMAT_VERSION = 1
QUANTIZED_TENSORS = (
    "attention q_proj/k_proj/v_proj/o_proj and expert w1/w2/w3; embeddings, lm_head, norms and "
    "router gates kept as stored"
)


@dataclass
class QuantConfig:
    scheme: str
    group_size: int | None
    double_quant: bool = False
    float_dtype: str | None = None
    expert_layout: ExpertBlobLayout | None = None
    source: dict[str, Any] = field(default_factory=dict)
    libraries: dict[str, str] = field(default_factory=dict)
    created: str = ""
    format_version: int = FORMAT_VERSION

    def handler(self) -> QuantScheme:
        float_dtype = dtype_from_name(self.float_dtype) if self.float_dtype else None
        return get_scheme(self.scheme, self.group_size, self.double_quant, float_dtype)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "scheme": self.scheme,
            "group_size": self.group_size,
            "double_quant": self.double_quant,
            "float_dtype": self.float_dtype,
            "quantized": QUANTIZED_TENSORS,
            "expert_layout": self.expert_layout.to_json() if self.expert_layout else None,
            "source": self.source,
            "libraries": self.libraries,
            "created": self.created,
        }

    def write(self, directory: Path) -> Path:
        path = directory / QUANT_CONFIG_FILE
        write_json_atomic(path, self.to_json())
        return path

    @classmethod
    def read(cls, directory: str | Path) -> QuantConfig:
        """Parse and check a directory's quant_config.json; one-line QuantizationError if bad."""
        path = Path(directory) / QUANT_CONFIG_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise QuantizationError(f"{path}: not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise QuantizationError(f"{path}: unreadable ({exc})") from None
        except ValueError as exc:
            raise QuantizationError(
                f"{path}: corrupt (not valid JSON: {exc}); re-run `mixtral-chat quantize`"
            ) from None
        if not isinstance(raw, dict):
            raise QuantizationError(f"{path}: corrupt (expected a JSON object)")
        if raw.get("format", FORMAT_NAME) != FORMAT_NAME:
            raise QuantizationError(
                f"{path}: not a mixtral-chat quantized model (format {raw.get('format')!r})"
            )
        version = raw.get("format_version")
        if not isinstance(version, int):
            raise QuantizationError(f"{path}: missing or invalid 'format_version'")
        if version > FORMAT_VERSION:
            raise QuantizationError(
                f"{path}: format version {version} is newer than this mixtral-chat reads ({FORMAT_VERSION}); "
                "upgrade mixtral-chat"
            )
        scheme = raw.get("scheme")
        if not isinstance(scheme, str):
            raise QuantizationError(f"{path}: missing or invalid 'scheme'")
        group_size = raw.get("group_size")
        if group_size is not None and (not isinstance(group_size, int) or isinstance(group_size, bool)):
            raise QuantizationError(f"{path}: invalid 'group_size' {group_size!r}")
        double_quant = raw.get("double_quant", False)
        if not isinstance(double_quant, bool):
            raise QuantizationError(f"{path}: invalid 'double_quant' {double_quant!r}")
        float_dtype = raw.get("float_dtype")
        layout_raw = raw.get("expert_layout")
        config = cls(
            scheme=scheme,
            group_size=group_size,
            double_quant=double_quant,
            float_dtype=float_dtype if isinstance(float_dtype, str) else None,
            expert_layout=ExpertBlobLayout.from_json(layout_raw) if layout_raw is not None else None,
            source=raw.get("source") or {},
            libraries=raw.get("libraries") or {},
            created=str(raw.get("created", "")),
            format_version=version,
        )
        try:
            handler = config.handler()
        except QuantizationError as exc:
            raise QuantizationError(f"{path}: {exc}") from None
        if config.expert_layout is not None:
            expected = ExpertBlobLayout.build(
                handler, config.expert_layout.hidden_size, config.expert_layout.intermediate_size
            )
            if expected != config.expert_layout:
                raise QuantizationError(
                    f"{path}: expert_layout does not match {handler.describe()} "
                    "(was the scheme or group size edited?)"
                )
        return config


def library_versions() -> dict[str, str]:
    from importlib import metadata

    versions: dict[str, str] = {}
    for dist in ("torch", "bitsandbytes", "safetensors", "mixtral-chat"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def sha256_file(path: Path) -> str | None:
    if not path.exists():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
