"""Cached teacher outputs: run the teacher once, keep its top-k logits on disk, distil from the file.

``cache_teacher_logits(teacher, batches, path, top_k=64)`` runs the teacher over ``batches``
(``no_grad``, eval mode, a progress bar on a terminal) and writes, for every counted position
(those whose ``attention_mask`` is non-zero and the one before each, when the batch has a mask), the ``k`` largest logits
(float16, minus the position's largest: softmax does not see the shift) with their vocabulary
indices (uint16 up to 65,536 entries, else int32) and the log of the rest's mass at the cache's
``temperature`` (float32). At k = 64 that is 260 bytes per position. ``load_teacher_logits(path)``
reopens the file as a sequence of :class:`TopKLogits` aligned with ``batches``; it reads the footer
only, and ``cache[i]`` reads batch ``i``'s bytes from the file when asked for (the file is never
held in memory, mapped or not).

>>> import os, tempfile, torch, torch.nn as nn
>>> from compress_callbacks import DistillationLoss
>>> teacher, student = nn.Linear(8, 100), nn.Linear(8, 100)
>>> batches = [torch.randn(4, 8) for _ in range(3)]
>>> path = os.path.join(tempfile.mkdtemp(), "teacher.topk")
>>> cache = cache_teacher_logits(teacher, batches, path, top_k=16, temperature=2.0)
>>> len(cache), cache[0].values.shape
(3, torch.Size([4, 16]))
>>> distill = DistillationLoss(None, temperature=2.0, alpha=1.0)     # no teacher in memory
>>> for x, entry in load_teacher_logits(path).zip(batches):
...     distill(student(x), teacher_outputs=entry, inputs=x).backward()
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .._progress import check_progress, progress_bar
from .divergences import DEFAULT_CHUNK_ELEMENTS, TopKRows, check_temperature

__all__ = ["TeacherLogitsCache", "TopKLogits", "cache_teacher_logits", "inputs_fingerprint", "load_teacher_logits", "teacher_top_k"]

_MAGIC = b"CCTOPK\x00\x01"  # first 8 bytes
_END = b"CCTOPKND"  # last 8 bytes, after the footer's length: a file without them was cut short
_FORMAT = "compress_callbacks.teacher_logits"
_VALUE_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_NUMPY = {"float16": np.float16, "bfloat16": np.int16, "float32": np.float32, "uint16": np.uint16, "int32": np.int32}


@dataclass(frozen=True, eq=False)
class TopKLogits:
    """A teacher's outputs for one batch as its top-k logits: pass it to ``DistillationLoss`` as ``teacher_outputs``.

    >>> import torch
    >>> logits = torch.randn(2, 10)
    >>> values, indices = logits.topk(10)
    >>> entry = TopKLogits(values, indices, vocab_size=10)
    >>> entry.shape, entry.top_k
    (torch.Size([2]), 10)

    Args:
        values: ``[..., k]`` the teacher's ``k`` largest logits (any shift per position: softmax
            ignores it; the cache stores them minus the largest).
        indices: ``[..., k]`` their vocabulary indices (distinct per position).
        log_tail: ``[...]`` ``log sum exp(logit / temperature)`` over the other vocabulary entries,
            in the same shift as ``values``; None: the teacher's mass outside the ``k`` entries is
            taken as 0 (the top-k renormalised).
        vocab_size: the vocabulary size (checked against the student's logits), or None.
        temperature: the temperature ``log_tail`` was computed at; the loss must use the same one
            unless the tail is empty (``k == vocab_size``) or None.
        counted: ``[...]`` bools, the positions that hold teacher outputs (the others hold
            placeholders, which the loss refuses to count); None: every position.
        fingerprint: a checksum of the inputs the teacher ran on (see :func:`inputs_fingerprint`);
            checked against the loss's ``inputs=`` when both are there.

    With ``k`` equal to the vocabulary the loss is exactly the full-logit loss; with fewer it
    compares the two distributions over ``k + 1`` outcomes (the ``k`` tokens and "any other"),
    which for the forward KL is a lower bound of the full KL, close when the tail is small.

    """

    values: torch.Tensor
    indices: torch.Tensor
    log_tail: torch.Tensor | None = None
    vocab_size: int | None = None
    temperature: float = 1.0
    counted: torch.Tensor | None = None
    fingerprint: int | None = None

    def __post_init__(self) -> None:
        values, indices = self.values, self.indices
        if not isinstance(values, torch.Tensor) or not values.is_floating_point() or values.dim() < 1:
            raise TypeError(f"`values` must be a floating-point tensor [..., k], got {type(values).__name__}")
        if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.dtype == torch.bool:
            raise TypeError("`indices` must be an integer tensor [..., k]")
        if indices.shape != values.shape:
            raise ValueError(f"`indices` shape {tuple(indices.shape)} differs from `values` shape {tuple(values.shape)}")
        leading = values.shape[:-1]
        if self.log_tail is not None and (not isinstance(self.log_tail, torch.Tensor) or self.log_tail.shape != leading):
            raise ValueError(f"`log_tail` must be a tensor of shape {tuple(leading)} (one value per position)")
        if self.counted is not None and (not isinstance(self.counted, torch.Tensor) or self.counted.shape != leading):
            raise ValueError(f"`counted` must be a bool tensor of shape {tuple(leading)}")
        if self.vocab_size is not None and (isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int)
                                            or self.vocab_size < values.shape[-1]):
            raise ValueError(f"`vocab_size` must be an int >= k = {values.shape[-1]}, got {self.vocab_size!r}")
        object.__setattr__(self, "temperature", check_temperature(self.temperature))
        if indices.numel():
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or (self.vocab_size is not None and high >= self.vocab_size):
                raise ValueError(f"`indices` must lie in [0, {self.vocab_size or 'vocab_size'}), got values in [{low}, {high}]")
            ordered = indices.sort(-1).values
            if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
                raise ValueError("`indices` repeat a vocabulary entry within a position: each of the k must be distinct")

    @property
    def shape(self) -> torch.Size:
        """The positions' shape: the student's logits without the vocabulary dim."""
        return self.values.shape[:-1]

    @property
    def top_k(self) -> int:
        return self.values.shape[-1]

    def _derived(self, **changes: Any) -> TopKLogits:
        """A copy with some fields changed, without checking again what was checked at construction."""
        new = object.__new__(TopKLogits)
        for field in fields(self):
            object.__setattr__(new, field.name, changes.get(field.name, getattr(self, field.name)))
        return new

    def to(self, device: torch.device | str) -> TopKLogits:
        """The same entry with its tensors on ``device``."""
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return self._derived(values=move(self.values), indices=move(self.indices), log_tail=move(self.log_tail),
                             counted=move(self.counted))

    def __getitem__(self, index: Any) -> TopKLogits:
        """Select positions (e.g. ``entry[:, :-1]``), as on the student's logits without their last dim."""
        index = index if isinstance(index, tuple) else (index,)
        if any(part is Ellipsis for part in index):
            raise IndexError("TopKLogits positions cannot be selected with `...`")
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return self._derived(values=self.values[index], indices=self.indices[index], log_tail=pick(self.log_tail),
                             counted=pick(self.counted))

    def rows(self, device: torch.device) -> TopKRows:
        """``[N, k]`` rows on ``device`` (indices as int64) for the row kernels."""
        k = self.top_k
        log_tail = None if self.log_tail is None else self.log_tail.reshape(-1).to(device, torch.float32)
        return TopKRows(self.values.reshape(-1, k).to(device), self.indices.reshape(-1, k).to(device, torch.int64), log_tail)


def teacher_top_k(logits: torch.Tensor, top_k: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values, indices, log_tail)`` of ``[N, V]`` logits: the k largest minus the row's largest, and the rest's log-mass.

    ``log_tail = log sum exp((x_j - max x) / T)`` over the entries not among the ``k`` (``-inf`` when
    ``k == V``), summed over those entries alone, so a small tail keeps its precision.

    >>> import torch
    >>> values, indices, log_tail = teacher_top_k(torch.tensor([[0.0, 2.0, 1.0]]), 2)
    >>> values.tolist(), indices.tolist(), round(float(log_tail), 4)
    ([[0.0, -1.0]], [[1, 2]], -2.0)
    """
    logits = logits.float()
    values, indices = logits.topk(top_k, dim=-1)
    top = values[:, :1].clone()
    values -= top
    rest = (logits - top).div_(temperature).scatter_(1, indices, float("-inf"))
    return values, indices, torch.logsumexp(rest, -1)


def inputs_fingerprint(inputs: Any) -> int:
    """A CRC-32 of what the teacher ran on: integer tensors (token ids, masks) in full, others by shape and dtype.

    A dict counts without its ``"labels"`` (the teacher never sees them), keys in sorted order.

    >>> import torch
    >>> ids = torch.tensor([[5, 6, 7]])
    >>> inputs_fingerprint({"input_ids": ids, "labels": ids}) == inputs_fingerprint({"input_ids": ids})
    True
    >>> inputs_fingerprint(ids) == inputs_fingerprint(ids + 1)
    False
    """
    crc = 0

    def visit(value: Any) -> None:
        nonlocal crc
        if isinstance(value, torch.Tensor):
            crc = zlib.crc32(f"{value.dtype}{tuple(value.shape)}".encode(), crc)
            if not (value.is_floating_point() or value.is_complex()):
                crc = zlib.crc32(value.detach().to("cpu", torch.int64).contiguous().numpy().tobytes(), crc)
        elif isinstance(value, Mapping):
            for key in sorted(k for k in value if k != "labels"):
                crc = zlib.crc32(str(key).encode(), crc)
                visit(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        else:
            crc = zlib.crc32(repr(value).encode(), crc)

    visit(inputs)
    return crc


# ---------------------------------------------------------------------------- writing
def cache_teacher_logits(
    teacher: nn.Module | Callable[..., Any],
    batches: Iterable[Any],
    path: str | os.PathLike,
    top_k: int = 64,
    inputs: str | Callable[[Any], Any] | None = None,
    *,
    temperature: float = 1.0,
    value_dtype: torch.dtype = torch.float16,
    progress: bool | None = None,
) -> TeacherLogitsCache:
    """Run ``teacher`` once over ``batches`` and write its top-k logits to ``path``; returns the reopened cache.

    Args:
        teacher: the model (run under ``no_grad`` in eval mode, its mode restored after) or a callable.
        batches: the batches in the order training will see them (e.g. a loader without shuffling).
        path: the file to write (written to ``path + ".partial"`` first, renamed when complete).
        top_k: logits kept per position, ``1 <= top_k <= V``.
        inputs: what the teacher runs on: None for the batch itself (a dict as keyword arguments,
            without its ``"labels"``), a key of a dict batch, or a callable ``batch -> inputs``.
        temperature: the temperature the tail mass is computed at; the loss must use the same one
            (any temperature works when ``top_k`` is the whole vocabulary).
        value_dtype: ``torch.float16`` (default), ``torch.bfloat16`` or ``torch.float32``.
        progress: a tqdm progress bar: None shows it on a terminal only, True always, False never.

    Counted positions: where a dict's ``"attention_mask"`` of the logits' leading shape is
    non-zero and the position before each (a shifted causal-LM loss counts it), else every
    position. For a bf16 teacher, call this under ``torch.autocast``. Raises ValueError for
    ``top_k`` out of range, a vocabulary that changes between batches or non-finite teacher
    logits; nothing is left at ``path`` then.
    """
    if not callable(teacher):
        raise TypeError(f"`teacher` must be an nn.Module or a callable, got {type(teacher).__name__}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"`top_k` must be an int >= 1, got {top_k!r}")
    if inputs is not None and not isinstance(inputs, str) and not callable(inputs):
        raise TypeError(f"`inputs` must be None, a key of the batch or a callable batch -> inputs, got {type(inputs).__name__}")
    if value_dtype not in _VALUE_DTYPES:
        raise ValueError(f"`value_dtype` must be torch.float16, torch.bfloat16 or torch.float32, got {value_dtype!r}")
    check_progress(progress)
    temperature = check_temperature(temperature)
    path = os.fspath(path)
    partial = path + ".partial"
    was_training = teacher.training if isinstance(teacher, nn.Module) else None
    try:
        with open(partial, "wb") as handle:
            handle.write(_MAGIC)
            footer = _write_entries(handle, teacher, progress_bar(batches, progress, desc="teacher logits"), top_k, inputs, temperature, value_dtype)
            encoded = json.dumps(footer).encode()
            handle.write(encoded + struct.pack("<Q", len(encoded)) + _END)
        os.replace(partial, path)
    except BaseException:
        if os.path.exists(partial):
            os.remove(partial)
        raise
    finally:
        if was_training is not None:
            teacher.train(was_training)
    return TeacherLogitsCache(path)


def _write_entries(handle, teacher, batches, top_k, inputs, temperature, value_dtype) -> dict[str, Any]:
    from .loss import extract_logits  # loss.py imports the losses, which import this module

    if isinstance(teacher, nn.Module):
        teacher.eval()
    device = next((p.device for p in teacher.parameters()), None) if isinstance(teacher, nn.Module) else None
    vocab, entries, offset = None, [], len(_MAGIC)
    value_name = _VALUE_DTYPES[value_dtype]
    index_name = None
    for number, batch in enumerate(batches):
        teacher_inputs = _select_inputs(batch, inputs)
        with torch.no_grad():
            moved = _to_device(teacher_inputs, device)
            outputs = teacher(**moved) if isinstance(moved, Mapping) else teacher(moved)
            logits = extract_logits(outputs, "teacher outputs").detach()
        if vocab is None:
            vocab = logits.shape[-1]
            if top_k > vocab:
                raise ValueError(f"`top_k` must be at most the vocabulary size {vocab}, got {top_k}")
            index_name = "uint16" if vocab <= 1 << 16 else "int32"
        elif logits.shape[-1] != vocab:
            raise ValueError(f"batch {number}: the teacher's vocabulary changed from {vocab} to {logits.shape[-1]} entries")
        leading = logits.shape[:-1]
        counted = _counted_positions(teacher_inputs, leading)
        rows = logits.reshape(-1, vocab)
        if counted is not None:
            rows = rows[counted.to(rows.device)]
        if rows.numel() and not bool(torch.isfinite(rows.amax(-1)).all()):
            raise ValueError(f"batch {number}: the teacher's logits are not finite (nan or +inf)")
        arrays = _encode_rows(rows, top_k, temperature, value_dtype, index_name)
        if counted is not None:
            arrays.append(np.packbits(counted.cpu().numpy().astype(np.uint8)))
        entry = {"shape": list(leading), "rows": int(rows.shape[0]), "offset": offset, "counted": counted is not None,
                 "fingerprint": inputs_fingerprint(teacher_inputs)}
        for array in arrays:
            data = array.tobytes()
            handle.write(data + b"\0" * (-len(data) % 8))  # every array starts 8-byte aligned
            offset += len(data) + (-len(data) % 8)
        entries.append(entry)
    return {"format": _FORMAT, "version": 1, "top_k": top_k, "vocab_size": vocab, "temperature": temperature,
            "value_dtype": value_name, "index_dtype": index_name, "data_end": offset, "batches": entries}


def _encode_rows(rows: torch.Tensor, top_k: int, temperature: float, value_dtype: torch.dtype, index_name: str) -> list[np.ndarray]:
    """The stored arrays of ``[N, V]`` logits: values, indices, tail log-masses (chunk by chunk: one float32 copy at a time)."""
    step = max(1, DEFAULT_CHUNK_ELEMENTS // rows.shape[1])
    parts = [teacher_top_k(rows[start:start + step], top_k, temperature) for start in range(0, rows.shape[0], step)]
    if parts:
        values, indices, log_tail = (torch.cat(part).cpu() for part in zip(*parts))
    else:
        values, indices, log_tail = torch.zeros(0, top_k), torch.zeros(0, top_k, dtype=torch.int64), torch.zeros(0)
    values = values.to(value_dtype)
    return [values.view(torch.int16).numpy() if value_dtype == torch.bfloat16 else values.numpy(),  # numpy has no bfloat16
            indices.numpy().astype(_NUMPY[index_name]), log_tail.numpy().astype(np.float32)]


def _select_inputs(batch: Any, inputs: str | Callable[[Any], Any] | None) -> Any:
    if inputs is None:
        return {k: v for k, v in batch.items() if k != "labels"} if isinstance(batch, Mapping) else batch
    if isinstance(inputs, str):
        if not isinstance(batch, Mapping) or inputs not in batch:
            raise ValueError(f"`inputs`={inputs!r}: the batch has no such key")
        return batch[inputs]
    return inputs(batch)


def _to_device(value: Any, device: torch.device | None) -> Any:
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _counted_positions(teacher_inputs: Any, leading: torch.Size) -> torch.Tensor | None:
    """Flat bools: where the attention mask is non-zero, and the position before each such one (a causal
    LM's shifted loss predicts the first real token of a left-padded row from the padding before it)."""
    mask = teacher_inputs.get("attention_mask") if isinstance(teacher_inputs, Mapping) else None
    if not isinstance(mask, torch.Tensor) or mask.shape != leading:
        return None
    counted = mask != 0
    if counted.dim() >= 2:
        counted[..., :-1] |= counted[..., 1:].clone()
    counted = counted.reshape(-1)
    return None if bool(counted.all()) else counted


# ---------------------------------------------------------------------------- reading
def load_teacher_logits(path: str | os.PathLike) -> TeacherLogitsCache:
    """Reopen a file written by :func:`cache_teacher_logits`: a sequence of :class:`TopKLogits`, one per batch."""
    return TeacherLogitsCache(path)


class TeacherLogitsCache(Sequence):
    """The batches of a teacher-logit file, read lazily: ``cache[i]`` reads batch ``i``'s bytes only.

    >>> import os, tempfile, torch, torch.nn as nn
    >>> path = os.path.join(tempfile.mkdtemp(), "teacher.topk")
    >>> _ = cache_teacher_logits(nn.Linear(8, 50), [torch.randn(4, 8), torch.randn(2, 8)], path, top_k=8)
    >>> cache = TeacherLogitsCache(path)
    >>> len(cache), cache.top_k, cache.positions, cache[1].values.shape
    (2, 8, 6, torch.Size([2, 8]))

    ``len(cache)`` is the number of batches written; ``cache.zip(batches)`` pairs them with the
    training batches and raises when the counts differ. Attributes: ``top_k``, ``vocab_size``,
    ``temperature``, ``positions`` (counted positions stored), ``nbytes`` (file size) and
    ``bytes_per_position``. Raises ValueError for a file that is not such a cache or was cut short.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.nbytes = os.path.getsize(self.path)
        footer = _read_footer(self.path, self.nbytes)
        self.top_k: int = footer["top_k"]
        self.vocab_size: int | None = footer["vocab_size"]
        self.temperature: float = footer["temperature"]
        self._value_dtype: str = footer["value_dtype"]
        self._index_dtype: str | None = footer["index_dtype"]
        self._entries: list[dict[str, Any]] = footer["batches"]
        self.positions = sum(entry["rows"] for entry in self._entries)
        self._data_end: int = footer["data_end"]

    @property
    def bytes_per_position(self) -> float:
        return self.nbytes / max(self.positions, 1)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return (f"TeacherLogitsCache({self.path!r}, batches={len(self)}, top_k={self.top_k}, vocab_size={self.vocab_size}, "
                f"temperature={self.temperature}, {self.bytes_per_position:.0f} bytes per position)")

    def __getitem__(self, number: int) -> TopKLogits:
        if isinstance(number, bool) or not isinstance(number, int):
            raise TypeError(f"a TeacherLogitsCache is indexed by batch number, got {type(number).__name__}")
        if not -len(self) <= number < len(self):
            raise IndexError(f"batch {number}: the cache holds {len(self)} batches (was it written from other data?)")
        number %= len(self)
        entry = self._entries[number]
        rows, k = entry["rows"], self.top_k
        data, offset = self._read(number), 0

        def take(name: str, count: int) -> np.ndarray:
            nonlocal offset
            dtype = np.dtype(_NUMPY[name]) if name != "packed" else np.dtype(np.uint8)
            array = np.frombuffer(data, dtype, count, offset).copy()
            offset += count * dtype.itemsize + (-count * dtype.itemsize % 8)
            return array

        values = torch.from_numpy(take(self._value_dtype, rows * k)).reshape(rows, k)
        if self._value_dtype == "bfloat16":
            values = values.view(torch.bfloat16)
        indices = torch.from_numpy(take(self._index_dtype, rows * k).astype(np.int64)).reshape(rows, k)
        log_tail = torch.from_numpy(take("float32", rows))
        shape = torch.Size(entry["shape"])
        counted = None
        if entry["counted"]:
            positions = shape.numel()
            counted = torch.from_numpy(np.unpackbits(take("packed", (positions + 7) // 8), count=positions).astype(bool))
            values, indices, log_tail = _expand(counted, values, indices, log_tail)
            counted = counted.reshape(shape)
        return TopKLogits(values.reshape(*shape, k), indices.reshape(*shape, k), log_tail.reshape(shape), self.vocab_size,
                          self.temperature, counted, entry["fingerprint"])

    def _read(self, number: int) -> bytes:
        """Batch ``number``'s bytes, read from the file now (nothing of the file is held in memory)."""
        start = self._entries[number]["offset"]
        end = self._entries[number + 1]["offset"] if number + 1 < len(self) else self._data_end
        with open(self.path, "rb") as handle:
            handle.seek(start)
            data = handle.read(end - start)
        if len(data) != end - start:
            raise ValueError(f"{self.path!r} was cut short after it was opened: batch {number} is incomplete")
        return data

    def zip(self, batches: Iterable[Any]) -> Iterator[tuple[Any, TopKLogits]]:
        """``(batch, entry)`` pairs; ValueError when ``batches`` gives more or fewer batches than the cache holds."""
        number = -1
        for number, batch in enumerate(batches):
            if number >= len(self):
                raise ValueError(f"`batches` gives more than the {len(self)} batches this cache holds: it was written from other data")
            yield batch, self[number]
        if number + 1 != len(self):
            raise ValueError(f"`batches` gave {number + 1} batches, this cache holds {len(self)}: it was written from other data")


def _expand(counted, values, indices, log_tail):
    """Rows for every position: the stored ones where ``counted``, finite placeholders elsewhere."""
    positions, k = counted.numel(), values.shape[1]
    full_values = torch.zeros(positions, k, dtype=values.dtype)
    full_indices = torch.arange(k).expand(positions, k).clone()  # distinct, so the placeholders pass every check
    full_tail = torch.full((positions,), float("-inf"))  # no tail: finite whatever k
    full_values[counted], full_indices[counted], full_tail[counted] = values, indices, log_tail
    return full_values, full_indices, full_tail


def _read_footer(path: str, size: int) -> dict[str, Any]:
    with open(path, "rb") as handle:
        if handle.read(len(_MAGIC)) != _MAGIC:
            raise ValueError(f"{path!r} is not a teacher-logit cache written by cache_teacher_logits")
        if size < len(_MAGIC) + 16:
            raise ValueError(f"{path!r} is truncated: the teacher-logit cache has no footer")
        handle.seek(size - 16)
        (length,), end = struct.unpack("<Q", handle.read(8)), handle.read(8)
        if end != _END or length > size - len(_MAGIC) - 16:
            raise ValueError(f"{path!r} is truncated: the teacher-logit cache was not written to the end")
        handle.seek(size - 16 - length)
        try:
            footer = json.loads(handle.read(length))
        except ValueError:
            raise ValueError(f"{path!r} is damaged: its footer is not readable") from None
    if footer.get("format") != _FORMAT or footer.get("version") != 1:
        raise ValueError(f"{path!r}: unknown teacher-logit cache format {footer.get('format')!r} v{footer.get('version')}")
    if footer["data_end"] != size - 16 - length:
        raise ValueError(f"{path!r} is damaged: its data ends at byte {size - 16 - length}, the footer says {footer['data_end']}")
    return footer
