"""The live status line: model, quantization, speed, context use, memory, expert-cache hits."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Any

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from mixtral_chat.engine.options import UNQUANTIZED
from mixtral_chat.engine.units import format_bytes


def process_rss_bytes() -> int | None:
    """Resident memory of this process: /proc on Linux (no psutil), getrusage's peak elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        # ru_maxrss is bytes on macOS, kilobytes on the other Unixes.
        return int(peak if sys.platform == "darwin" else peak * 1024)
    except (ImportError, OSError):
        return None


def gpu_memory_bytes(device: str) -> tuple[int, int] | None:
    """(allocated, total) bytes on a CUDA device, if torch is already loaded (never imported here)."""
    torch = sys.modules.get("torch")
    if torch is None or not device.startswith("cuda"):
        return None
    try:
        if not torch.cuda.is_available():
            return None
        index = torch.device(device).index or 0
        return int(torch.cuda.memory_allocated(index)), int(
            torch.cuda.get_device_properties(index).total_memory
        )
    except Exception:  # a driver hiccup must not break the status line
        return None


@dataclass(frozen=True)
class StatusInfo:
    model: str = "no model"
    scheme: str = ""
    device: str = ""
    loading: bool = False
    tok_s: float | None = None
    ttft_s: float | None = None
    context_used: int | None = None
    context_total: int | None = None
    rss_bytes: int | None = None
    gpu: tuple[int, int] | None = None
    cache_hit_rate: float | None = None
    generating: bool = False
    busy_pid: int | None = None  # another app (this pid) is answering in the chat shown


class StatusBar(Static):
    """One line at the bottom of the chat; memory is refreshed every second."""

    info: reactive[StatusInfo] = reactive(StatusInfo, layout=False)

    def on_mount(self) -> None:
        self._refresh_memory()
        self.set_interval(1.0, self._refresh_memory)

    def update_info(self, **changes: Any) -> None:
        self.info = replace(self.info, **changes)

    def _refresh_memory(self) -> None:
        self.update_info(rss_bytes=process_rss_bytes(), gpu=gpu_memory_bytes(self.info.device))

    def watch_info(self, info: StatusInfo) -> None:
        self.update(self.render_info(info))

    @staticmethod
    def render_info(info: StatusInfo) -> Text:
        parts: list[Text] = []
        model = Text(info.model, style="bold")
        if info.loading:
            model.append(" (loading)", style="italic")
        if info.scheme and info.scheme != UNQUANTIZED:  # float weights: the dtype after the device says it
            model.append(f" · {info.scheme}")
        if info.device:
            model.append(f" · {info.device}")
        parts.append(model)
        if info.busy_pid is not None:
            parts.append(Text(f"busy: answered in pid {info.busy_pid}", style="bold yellow"))
        if info.tok_s is not None:
            parts.append(Text(f"{info.tok_s:.1f} tok/s" + (" …" if info.generating else "")))
        if info.ttft_s is not None:
            parts.append(Text(f"TTFT {info.ttft_s * 1000:.0f} ms"))
        if info.context_total:
            used = info.context_used or 0
            style = "bold red" if used >= 0.9 * info.context_total else ""
            parts.append(Text(f"ctx {used}/{info.context_total}", style=style))
        if info.rss_bytes is not None:
            parts.append(Text(f"RAM {format_bytes(info.rss_bytes, binary=True)}"))
        if info.gpu is not None:
            used, total = (format_bytes(n, binary=True) for n in info.gpu)
            parts.append(Text(f"GPU {used}/{total}"))
        if info.cache_hit_rate is not None:
            parts.append(Text(f"expert cache {info.cache_hit_rate * 100:.0f}% hits"))
        return Text(" │ ", style="dim").join(parts)
