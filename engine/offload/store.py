"""Every expert's blob in one host store: RAM (pinned when CUDA is used) or files (read with pread
into a slot, or mapped for the CPU to compute on in place).

A store holds one contiguous blob per expert (all its weights and scales, laid out by
`quant.blob.ExpertBlobLayout`), so a miss is one copy. When the runtime experts are plain views
of the blobs a quantized directory stores, or are packed on the device from them after each copy
(`StoredExperts`), the store is filled from those files directly, and the disk tier is the
quantized shards themselves: no expert is ever materialised outside the cache.
"""

from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path

import torch
from torch import Tensor, nn

from mixtral_chat.engine import heap
from mixtral_chat.engine.config import ModelArgs
from mixtral_chat.engine.errors import MixtralChatError, OutOfMemoryError
from mixtral_chat.engine.load_progress import note_read
from mixtral_chat.engine.model import Expert
from mixtral_chat.engine.offload import residency
from mixtral_chat.engine.offload.placement import host_reserve_bytes
from mixtral_chat.quant.blob import ExpertBlobLayout, expert_linears_from_blob
from mixtral_chat.quant.load import ExpertBlobReader


class ExpertStore:
    """Every expert's blob in host memory or on disk."""

    def __init__(self, layout: ExpertBlobLayout, num_layers: int, num_experts: int) -> None:
        self.layout = layout
        self.num_layers = num_layers
        self.num_experts = num_experts

    def copy_into(
        self, layer: int, expert: int, out: Tensor, start: int, end: int, non_blocking: bool
    ) -> None:
        """Copy bytes [start, end) of the expert's blob into the same bytes of `out`."""
        raise NotImplementedError

    def blob(self, layer: int, expert: int) -> Tensor:
        """The expert's blob in host memory, uint8 [nbytes]: a CPU module bound to views of it
        computes in place (`CpuExperts`). Only read from: a store's bytes never change."""
        raise NotImplementedError

    def resident_share(self, layer: int, expert: int) -> float:
        """Of the expert's bytes, the share in memory now (1.0 for a RAM store)."""
        return 1.0

    def put(self, layer: int, expert: int, module: nn.Module) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release files and memory."""


GB = 1e9


def choose_store(store_bytes: int, available_ram_bytes: int) -> str:
    """ "ram" when every expert fits in the RAM available with room to spare (1 GB or 5% of the
    store, whichever is more, for the rest of the process and the system), else "disk"."""
    return "ram" if store_bytes + host_reserve_bytes(store_bytes) <= available_ram_bytes else "disk"


def pin_in_place(buffer: Tensor) -> None:
    """Page-lock a pageable host buffer for fast async copies (cudaHostRegister, as
    torch/cuda/_pin_memory_utils.py does). PyTorch's pinned allocator would round a 25 GB store up
    to the next power of two (34 GB pinned); registering pins exactly the buffer's bytes. A failed
    pin is a CUDA error code, not torch.OutOfMemoryError: it becomes one line with the numbers."""
    nbytes = buffer.numel() * buffer.element_size()
    code = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 1))  # 1: portable
    if code != 0:
        raise OutOfMemoryError(
            f"cannot pin {nbytes / GB:.2f} GB of host memory for the expert store (CUDA error {code}): "
            "use --offload disk, or free RAM / raise the locked-memory limit (ulimit -l)"
        )


class RamStore(ExpertStore):
    """One host buffer for every expert, pinned in place when the compute device is a GPU."""

    def __init__(self, layout: ExpertBlobLayout, num_layers: int, num_experts: int, pin: bool) -> None:
        super().__init__(layout, num_layers, num_experts)
        # One pageable allocation sliced per expert, then registered: pinned bytes = store bytes.
        total = num_layers * num_experts * layout.nbytes
        self.buffer = torch.empty(total, dtype=torch.uint8)
        heap.prefer_huge_pages(self.buffer.data_ptr(), total)  # before any expert is written
        self.pinned = False
        if pin and torch.cuda.is_available():
            pin_in_place(self.buffer)
            self.pinned = True

    def blob(self, layer: int, expert: int) -> Tensor:
        start = (layer * self.num_experts + expert) * self.layout.nbytes
        return self.buffer[start : start + self.layout.nbytes]

    def put(self, layer: int, expert: int, module: nn.Module) -> None:
        self.layout.pack_module(module, self.blob(layer, expert))

    def copy_into(
        self, layer: int, expert: int, out: Tensor, start: int, end: int, non_blocking: bool
    ) -> None:
        out[start:end].copy_(self.blob(layer, expert)[start:end], non_blocking=non_blocking)

    def fill_from(self, source: ExpertStore) -> None:
        """Every expert's blob read from another store (the quantized files)."""
        for layer in range(self.num_layers):
            for expert in range(self.num_experts):
                source.copy_into(layer, expert, self.blob(layer, expert), 0, self.layout.nbytes, False)

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
            self.pinned = False
        self.buffer = torch.empty(0, dtype=torch.uint8)


class FileStore(ExpertStore):
    """Blobs at known offsets in open files: read with pread straight into a slot (or into a
    pinned staging buffer for a GPU slot), or mapped for the CPU to compute on (`blob`).

    Either way the bytes live in the kernel's page cache, which caches what RAM can hold and drops
    it under pressure, instead of counting as this process's anonymous memory. A CPU-computed
    expert reads its mapping in place (as llama.cpp computes on its mmap'd model): measured on a
    Mixtral expert in the page cache, a pread into a buffer then the GEMV took 4.5-4.8x a RAM
    store's GEMV, the GEMV on the mapping 1.00-1.10x (`bench/bench_mapped_expert.py`).
    """

    def __init__(self, layout: ExpertBlobLayout, num_layers: int, num_experts: int, where: str) -> None:
        super().__init__(layout, num_layers, num_experts)
        self.where = where
        self._location: dict[tuple[int, int], tuple[int, int]] = {}  # (layer, expert) -> (fd, offset)
        self._fd_of: dict[Path, int] = {}  # every open file
        self._staging: dict[int, Tensor] = {}  # per thread, for GPU targets
        self._mapped: dict[int, tuple[mmap.mmap, int]] = {}  # fd -> its file mapped, and where
        self._map_lock = threading.Lock()

    def copy_into(
        self, layer: int, expert: int, out: Tensor, start: int, end: int, non_blocking: bool
    ) -> None:
        fd, offset = self._location[(layer, expert)]
        if out.device.type == "cpu":
            target = out[start:end]
        else:
            key = threading.get_ident()
            if key not in self._staging:
                staging = torch.empty(self.layout.nbytes, dtype=torch.uint8)
                pin_in_place(staging)  # exactly its bytes (the pinned allocator rounds up)
                self._staging[key] = staging
            target = self._staging[key][: end - start]
        read = os.preadv(fd, [memoryview(target.numpy())], offset + start)
        if read != end - start:
            raise MixtralChatError(f"{self.where}: expert {expert} of layer {layer} is truncated")
        note_read(read)  # counted while a load warms the caches; a no-op while answering
        if out.device.type != "cpu":
            out[start:end].copy_(target, non_blocking=False)

    def blob(self, layer: int, expert: int) -> Tensor:
        """A view of the expert's bytes in a copy-on-write mapping of its file (the page cache's
        pages, shared with every reader; nothing is written through it)."""
        fd, offset = self._location[(layer, expert)]
        mapped, _ = self._mapping(fd)
        if offset + self.layout.nbytes > len(mapped):
            raise MixtralChatError(f"{self.where}: expert {expert} of layer {layer} is truncated")
        return torch.frombuffer(mapped, dtype=torch.uint8, count=self.layout.nbytes, offset=offset)

    def _mapping(self, fd: int) -> tuple[mmap.mmap, int]:
        with self._map_lock:
            if fd not in self._mapped:
                mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
                self._mapped[fd] = (mapped, residency.address(mapped))
            return self._mapped[fd]

    def resident_share(self, layer: int, expert: int) -> float:
        """The share of the blob's pages in the page cache, from mincore over four windows spread
        along it, 1/32 of it each (the whole blob took 0.15 ms for a Mixtral expert, 3-4% of its
        GEMV; a blob's pages are read together and age together); 1.0 where mincore cannot be
        called (not Linux or macOS)."""
        fd, offset = self._location[(layer, expert)]
        _, base = self._mapping(fd)
        page = mmap.PAGESIZE
        first = offset // page
        pages = (offset + self.layout.nbytes + page - 1) // page - first
        window = max(1, pages // 32)
        starts = {first + (pages - window) * i // 3 for i in range(4)}
        return sum(residency.share(base, start * page, window) for start in starts) / len(starts)

    def place(self, layer: int, expert: int, path: Path, offset: int) -> None:
        """The expert's blob is at `offset` in `path` (each file opened once, read-only)."""
        if path not in self._fd_of:
            self._fd_of[path] = os.open(path, os.O_RDONLY)
        self._location[(layer, expert)] = (self._fd_of[path], offset)

    @property
    def fds(self) -> list[int]:
        """The open files the blobs are read from."""
        return list(self._fd_of.values())

    def close(self) -> None:
        for fd in self._fd_of.values():
            os.close(fd)
        self._fd_of.clear()
        # A mapping outlives its descriptor; it is unmapped once no view of it is left.
        self._mapped.clear()


class DiskStore(FileStore):
    """A pack file of runtime blobs, written at start-up from the loaded experts."""

    def __init__(self, layout: ExpertBlobLayout, num_layers: int, num_experts: int, path: Path) -> None:
        super().__init__(layout, num_layers, num_experts, str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        # Unlinked at once: the open descriptor keeps the data, and a crash leaves no
        # gigabytes behind.
        path.unlink()
        self._fd_of[path] = self._fd
        for layer in range(num_layers):
            for expert in range(num_experts):
                self._location[(layer, expert)] = (self._fd, (layer * num_experts + expert) * layout.nbytes)

    def put(self, layer: int, expert: int, module: nn.Module) -> None:
        blob = self.layout.pack_module(module)
        written = os.pwrite(self._fd, memoryview(blob.numpy()), self._location[(layer, expert)][1])
        if written != self.layout.nbytes:
            raise MixtralChatError(f"{self.where}: short write while building the expert store (disk full?)")


class StoredExperts:
    """The expert blobs of a quantized directory, streamed from its files.

    The store is filled from (RAM) or is (disk) the quantized shards, read expert by expert, and
    an expert moves as the stored bytes. Two ways a slot computes on them:
    - views (`repacked` False): the runtime modules compute on the stored parts in place, nf4
      (CPU and CUDA) and int4 on the native CPU kernel;
    - repacked (`repacked` True): int4 on an offloading device whose form differs (tinygemm on
      CUDA): the stored blob is copied into a staging buffer on the device, then packed into the
      slot's own runtime tensors (`ExpertBlobLayout.repack`), one small kernel after each copy.
    `open` returns None where neither applies (a float model converts dtypes), or where repacking
    is not asked for (ATen's CPU int4, ~2 s per Mixtral expert to repack on a CPU: the experts are
    then loaded and packed in their runtime form as before).
    """

    def __init__(
        self,
        model_dir: Path,
        reader: ExpertBlobReader,
        layout: ExpertBlobLayout,
        template: nn.Module,
        dtype: torch.dtype,
        repacked: bool = False,
    ) -> None:
        self.model_dir = model_dir
        self.dtype = dtype  # the compute dtype the runtime experts were built for
        self.reader = reader
        self.layout = layout  # of the stored blob: the store's, and the slots' (or their staging's)
        self.template = template  # a meta shell of the runtime expert, for the cache's slots
        self.repacked = repacked

    @classmethod
    def open(
        cls, model_dir: Path, device: torch.device, dtype: torch.dtype, repack: bool | None = None
    ) -> StoredExperts | None:
        """`repack`: accept a runtime form that is packed from the blob after each copy (default:
        on a device other than the CPU, where the pack is a kernel on the device)."""
        reader = ExpertBlobReader(model_dir)
        args = ModelArgs.from_hf_config(model_dir)
        if not reader.experts():
            return None
        with torch.device("meta"):
            template = Expert(args.hidden_size, args.intermediate_size)
        blob = reader.read(*reader.experts()[0]).to(device)
        linears = expert_linears_from_blob(blob, reader.layout, reader.scheme, device, dtype)
        for name, module in linears.items():
            setattr(template, name, module)
        layout = ExpertBlobLayout.viewing(template, blob)
        if layout is not None:
            return cls(model_dir, reader, layout, template.to("meta"), dtype)
        if not (device.type != "cpu" if repack is None else repack):
            return None
        if not all(hasattr(module, "repack_from") for module in linears.values()):
            return None
        return cls(model_dir, reader, reader.layout, template.to("meta"), dtype, repacked=True)

    def cpu_template(self) -> nn.Module | None:
        """A meta shell of the CPU form of these experts, if it computes on the same blob layout
        (nf4 and int4 on the native kernel do); None where the CPU form differs (ATen's int4)."""
        cpu = StoredExperts.open(self.model_dir, torch.device("cpu"), self.dtype)
        if cpu is None or cpu.layout != self.layout:
            return None
        return cpu.template

    def file_store(self, num_layers: int, num_experts: int) -> FileStore:
        """The quantized shards as a store: every expert's blob where the file has it."""
        store = FileStore(self.layout, num_layers, num_experts, str(self.model_dir))
        try:
            for layer in range(num_layers):
                for expert in range(num_experts):
                    file, offset, nbytes = self.reader.location(layer, expert)
                    if nbytes != self.layout.nbytes:
                        raise MixtralChatError(
                            f"{file}: expert {expert} of layer {layer} is {nbytes} bytes, "
                            f"quant_config.json says {self.layout.nbytes}"
                        )
                    store.place(layer, expert, file, offset)
        except BaseException:
            store.close()
            raise
        return store
