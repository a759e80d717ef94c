"""BitDelta ``sign1`` codec: a fine-tuned matrix as ``base + s * sign(delta)``.

For a base matrix ``W_base`` and a fine-tuned matrix ``W_ft`` (both ``[N, K]``):

* ``delta = W_ft.float() - W_base.float()`` (fp32);
* ``S = where(delta >= 0, +1, -1)`` -- packed with :func:`deltahub.codec.packing.pack_signs`
  into int32 ``[N, ceil(K/32)]`` (layout v1);
* ``s = fp32(mean(|delta|))`` -- the L2-optimal scale for a fixed sign matrix;
* reconstruction: ``out = (W_base.to(float32) + s * S).to(out_dtype)`` (see
  :func:`decode_sign1` for the exact, bit-reproducible formula).

Everything runs in row chunks so that memory stays bounded for any matrix size.
This module imports nothing from the rest of deltahub.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from collections.abc import Mapping

from .base import DeltaOperator, Encoded, JSONValue, PartSpec, PlanesLayout, TensorCodec
from .codecs import CodecError, NonFiniteDeltaError
from .packing import (
    WORD_BITS,
    check_packed,
    gather_signs,
    packed_shape,
    unpack_signs,
)

__all__ = [
    "DeltaStats",
    "Sign1Encoded",
    "encode_sign1",
    "decode_sign1",
    "reference_decode_sign1",
    "fp32_scale",
]

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 64 << 20
"""Default bound on the temporaries of one row chunk (64 MiB)."""

# Temporaries per matrix element in encode_sign1 (per worker): fp32 base + fp32 delta +
# fp64 scratch + bool signs + packed bytes, rounded up.
_ENCODE_BYTES_PER_ELEM = 24

# Encode/decode work in row tiles of at most this many elements, each tile's ops single-threaded
# (one intra-op thread), tiles handed out to one worker thread per torch thread of the caller
# (``torch.get_num_threads()``). Measured on the shared 2-core machine (5632x2048 fp16, load
# average 6-8): torch's own intra-op threads inside 256K-element tiles took 0.3-2.5 s per encode
# (every op ends on an OpenMP barrier, and a descheduled thread stalls each one), one thread 0.046 s;
# worker threads that take tiles from a queue never wait for each other. 64K elements keep a tile's
# temporaries (fp32 base, delta, fp64 scratch) within a core's L2 cache.
_SERIAL_ELEMS = 1 << 16
# Below this many elements encode/decode run inline on the calling thread.
_PARALLEL_MIN_ELEMS = 1 << 20

_FP32_MAX = float(torch.finfo(torch.float32).max)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class DeltaStats:
    """Sums over one matrix's delta, accumulated in float64.

    Attributes:
        numel: number of elements ``N*K``.
        abs_sum: ``sum(|delta|)``.
        delta_sq_sum: ``sum(delta**2)``.
        base_sq_sum: ``sum(W_base**2)``.
    """

    numel: int
    abs_sum: float
    delta_sq_sum: float
    base_sq_sum: float

    @property
    def rel_delta_norm(self) -> float:
        """``||delta||_F / ||W_base||_F``; 0 if both are zero, ``inf`` if only the base is."""
        if self.base_sq_sum == 0.0:
            return 0.0 if self.delta_sq_sum == 0.0 else math.inf
        return math.sqrt(self.delta_sq_sum) / math.sqrt(self.base_sq_sum)

    def rel_recon_error(self, scale: float) -> float:
        """``||delta - scale*S||_F / ||delta||_F`` with ``S = sign(delta)`` (0 -> +1).

        Computed from the sums: ``err^2 = sum(delta^2) - 2*scale*sum|delta| +
        scale^2*numel`` (clamped at 0). Returns 0.0 when ``||delta|| == 0``.
        """
        if self.delta_sq_sum == 0.0:
            return 0.0
        err_sq = self.delta_sq_sum - 2.0 * scale * self.abs_sum + scale * scale * self.numel
        return math.sqrt(max(err_sq, 0.0)) / math.sqrt(self.delta_sq_sum)


@dataclass
class Sign1Encoded:
    """Result of :func:`encode_sign1`.

    Attributes:
        packed: ``torch.int32`` ``[N, ceil(K/32)]`` packed signs (layout v1).
        scale: the fp32 scale as a Python float (exactly representable in fp32).
        stats: float64 sums over the delta.
        rel_recon_error: ``stats.rel_recon_error(scale)``.
    """

    packed: torch.Tensor
    scale: float
    stats: DeltaStats
    rel_recon_error: float


def fp32_scale(value: float) -> float:
    """Round a Python float to the nearest fp32 value (returned as a Python float)."""
    return float(torch.tensor(value, dtype=torch.float32))


def _check_matrix(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise CodecError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise CodecError(f"{name} must be a 2-D matrix, got shape {list(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise CodecError(f"{name} must be fp32/fp16/bf16 (or fp64), got {t.dtype}")
    if t.device.type != "cpu":
        raise CodecError(f"{name} must be on the CPU, got {t.device}")


def _row_sums_into(x: torch.Tensor, out: torch.Tensor) -> None:
    """Per-row sums of a float64 ``[R, K]`` tensor into float64 ``out`` ``[R]``.

    Each row is reduced serially by one thread whatever ``R`` is: torch splits a reduction
    whose output has a single element across threads (results then depend on the thread
    count), so a single row is padded with a zero row. The per-row results therefore do
    not depend on how rows are grouped into chunks.
    """
    if x.shape[0] == 1:
        out.copy_(torch.cat([x, torch.zeros_like(x)]).sum(dim=1)[:1])
    else:
        torch.sum(x, dim=1, out=out)


class _BlockQueue:
    """Hands out block indices ``0, 1, 2, ...`` to worker threads, in increasing order.

    ``limit(b)`` stops handing out blocks ``>= b``; since blocks are handed out in order,
    every block below ``b`` has then already been handed out and will be finished.
    """

    def __init__(self, n_blocks: int) -> None:
        self._next = 0
        self._end = n_blocks
        self._lock = threading.Lock()

    def take(self) -> int | None:
        with self._lock:
            if self._next >= self._end:
                return None
            b = self._next
            self._next += 1
            return b

    def limit(self, b: int) -> None:
        with self._lock:
            self._end = min(self._end, b)


def _workers(n_blocks: int, numel: int, k: int, threads: int | None = None) -> int:
    """Worker threads for a chunked job: ``threads`` (default: the caller's
    ``torch.get_num_threads()``), at most one per block, and one for small matrices."""
    if numel < _PARALLEL_MIN_ELEMS:
        return 1
    wanted = torch.get_num_threads() if threads is None else threads
    return max(1, min(wanted, n_blocks))


@contextmanager
def _one_intraop_thread(restore: int) -> Iterator[None]:
    """Run this thread's torch ops on one intra-op thread, then set ``restore`` threads again.

    The intra-op thread count of OpenMP is per thread (each thread's own ICV): setting it here does
    not change the other threads' ops. Torch also keeps the value for threads that start later, so it
    is put back to the caller's count at the end.
    """
    if restore <= 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(restore)


def _run_blocks(n_blocks: int, workers: int, fn: Callable[[_BlockQueue], None]) -> None:
    """Run ``fn(queue)`` on ``workers`` threads (inline if 1) until the queue is empty.

    Each call of ``fn`` takes blocks from the shared queue until it is empty (dynamic
    scheduling: a thread descheduled by other processes just takes fewer blocks, and no thread
    ever waits for another mid-way). Every worker runs its torch ops on one intra-op thread, so
    ``workers`` threads use ``workers`` cores; torch releases the GIL inside ops, so the threads'
    torch work runs in parallel.
    """
    queue = _BlockQueue(n_blocks)
    restore = torch.get_num_threads()

    def run() -> None:
        try:
            with torch.no_grad(), _one_intraop_thread(restore):  # grad mode is per thread
                fn(queue)
        except BaseException:
            queue.limit(0)  # the other workers stop after their current block
            raise

    if workers <= 1:
        run()
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deltahub-codec") as pool:
        futures = [pool.submit(run) for _ in range(workers)]
    for fut in futures:
        fut.result()  # re-raises the first worker's exception, if any


def run_row_blocks(n_rows: int, rows: int, numel: int, worker: Callable[[], Callable[[int, int], None]],
                   threads: int | None = None) -> None:
    """Process rows ``0 .. n_rows`` in consecutive blocks of ``rows`` rows on the worker threads of
    :func:`_run_blocks` (each with one intra-op thread): each worker thread calls ``worker()`` once
    (to allocate its buffers) and then the function it returns with ``(r0, r1)`` for every block it
    takes. Blocks must write only their own rows; the result then does not depend on the threads.
    An exception in any block stops the others after their current block and is re-raised."""
    n_blocks = (n_rows + rows - 1) // rows

    def work(queue: _BlockQueue) -> None:
        fn = worker()
        while (b := queue.take()) is not None:
            fn(b * rows, min(n_rows, (b + 1) * rows))

    _run_blocks(n_blocks, _workers(n_blocks, numel, 1, threads), work)


def _describe_nonfinite(delta: torch.Tensor, row0: int) -> str:
    """Name the first non-finite value of ``delta`` (rows ``row0 ..``) and count them."""
    bad = ~torch.isfinite(delta)
    r, c = (int(v) for v in bad.nonzero()[0])
    kind = "NaN" if math.isnan(float(delta[r, c])) else "Inf"
    count = int(bad.sum())
    last = row0 + delta.shape[0] - 1
    return f"{kind} in delta at [{row0 + r}, {c}] ({count} non-finite values in rows {row0}..{last})"


def encode_sign1(
    base: torch.Tensor,
    finetuned: torch.Tensor,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    threads: int | None = None,
) -> Sign1Encoded:
    """Encode ``finetuned`` relative to ``base`` as packed signs plus one fp32 scale.

    One pass over row chunks: ``delta = finetuned.float() - base.float()`` in fp32, pack
    ``delta >= 0`` and compute per-row float64 sums (``|delta|``, ``delta**2``,
    ``base**2``); the row sums are added exactly (``math.fsum``) at the end. Each row's
    sum is reduced by one thread in a fixed order, so the result is deterministic and does
    not depend on the chunking, the number of threads or ``chunk_bytes``. Tiles hold at most
    256K elements (and ``chunk_bytes`` of temporaries); torch's intra-op threads parallelise
    each tile, like :func:`decode_sign1`.

    Args:
        base: ``[N, K]`` fp32/fp16/bf16 CPU tensor.
        finetuned: ``[N, K]`` fp32/fp16/bf16 CPU tensor (its dtype may differ from base's).
        chunk_bytes: bound on per-chunk temporaries (per worker thread), in bytes.
        threads: worker threads over tiles (default 1: the calling thread, with torch's own
            intra-op threads inside each op).
            The result does not depend on it.

    Returns:
        :class:`Sign1Encoded` with ``packed`` int32 ``[N, ceil(K/32)]`` and
        ``scale = fp32(sum|delta| / numel)`` (0.0 for an empty matrix).

    Raises:
        CodecError: not 2-D, shapes differ, unsupported dtype, or delta has NaN/Inf.
    """
    _check_matrix("base", base)
    _check_matrix("finetuned", finetuned)
    if base.shape != finetuned.shape:
        raise CodecError(
            f"shape mismatch: base is {list(base.shape)}, finetuned is {list(finetuned.shape)}"
        )
    n, k = base.shape
    _, w = packed_shape(n, k)
    packed = torch.zeros((n, w), dtype=torch.int32)
    numel = n * k
    if numel == 0:
        stats = DeltaStats(numel=0, abs_sum=0.0, delta_sq_sum=0.0, base_sq_sum=0.0)
        return Sign1Encoded(packed=packed, scale=0.0, stats=stats, rel_recon_error=0.0)

    packed_bytes = packed.numpy().view("uint8")  # [N, 4W], shares memory with `packed`
    row_abs = torch.empty(n, dtype=torch.float64)
    row_dsq = torch.empty(n, dtype=torch.float64)
    row_bsq = torch.empty(n, dtype=torch.float64)
    rows = max(1, min(_SERIAL_ELEMS // k, chunk_bytes // (k * _ENCODE_BYTES_PER_ELEM)))
    n_blocks = (n + rows - 1) // rows
    nbytes = (k + 7) // 8
    bad_blocks: list[int] = []
    base_f32 = base.dtype == torch.float32
    ft_f32 = finetuned.dtype == torch.float32

    def work(queue: _BlockQueue) -> None:
        b32_buf = None if base_f32 else torch.empty((rows, k), dtype=torch.float32)
        d32_buf = torch.empty((rows, k), dtype=torch.float32)
        d64_buf = torch.empty((rows, k), dtype=torch.float64)
        ge_buf = np.empty((rows, k), dtype=np.bool_)
        while (b := queue.take()) is not None:
            r0 = b * rows
            r1 = min(n, r0 + rows)
            r = r1 - r0
            if b32_buf is None:
                b32 = base[r0:r1]
            else:
                b32 = b32_buf[:r]
                b32.copy_(base[r0:r1])  # exact widening
            d32 = d32_buf[:r]
            if ft_f32:
                torch.sub(finetuned[r0:r1], b32, out=d32)
            else:
                d32.copy_(finetuned[r0:r1])
                d32.sub_(b32)  # delta in fp32
            # numpy's compare is vectorized (torch's compares into bool run ~20x slower here); NaN
            # gives False like torch's, -0.0 gives True.
            ge = ge_buf[:r]
            np.greater_equal(d32.numpy(), np.float32(0), out=ge)
            packed_bytes[r0:r1, :nbytes] = np.packbits(ge, axis=-1, bitorder="little")
            d64 = d64_buf[:r]
            d64.copy_(d32)
            _row_sums_into(d64.abs_(), row_abs[r0:r1])
            # A row sum of |delta| is finite iff the row is: fp32 magnitudes summed in
            # float64 cannot overflow. One check on [rows] instead of a pass over delta.
            if not bool(torch.isfinite(row_abs[r0:r1]).all()):
                bad_blocks.append(b)
                queue.limit(b)  # blocks before b are already handed out and will finish
                return
            _row_sums_into(d64.square_(), row_dsq[r0:r1])  # |d|^2 == d^2 exactly
            d64.copy_(b32)
            _row_sums_into(d64.square_(), row_bsq[r0:r1])

    _run_blocks(n_blocks, _workers(n_blocks, numel, k, threads), work)
    if bad_blocks:  # report the first non-finite value of the matrix
        r0 = min(bad_blocks) * rows
        r1 = min(n, r0 + rows)
        delta = finetuned[r0:r1].to(torch.float32) - base[r0:r1].to(torch.float32)
        raise NonFiniteDeltaError(f"non-finite delta: {_describe_nonfinite(delta, r0)}")

    abs_sum = math.fsum(row_abs.tolist())
    stats = DeltaStats(
        numel=numel,
        abs_sum=abs_sum,
        delta_sq_sum=math.fsum(row_dsq.tolist()),
        base_sq_sum=math.fsum(row_bsq.tolist()),
    )
    scale = fp32_scale(abs_sum / numel)
    err = stats.rel_recon_error(scale)
    logger.debug(
        "sign1 encode [%d, %d]: scale=%.6g rel_delta_norm=%.4g rel_recon_error=%.4f",
        n, k, scale, stats.rel_delta_norm, err,
    )
    return Sign1Encoded(packed=packed, scale=scale, stats=stats, rel_recon_error=err)


def _check_decode_args(
    base: torch.Tensor, packed: torch.Tensor, scale: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """Validate decode arguments; return the scale as a 0-d fp32 tensor."""
    _check_matrix("base", base)
    n, k = base.shape
    check_packed(packed, k, n)
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        raise CodecError(f"out_dtype must be a floating torch.dtype, got {out_dtype!r}")
    try:
        s = torch.tensor(float(scale), dtype=torch.float32)
    except (TypeError, ValueError) as exc:
        raise CodecError(f"scale must be a number, got {scale!r}") from exc
    if not bool(torch.isfinite(s)):
        raise CodecError(f"scale must be finite in fp32, got {scale!r}")
    return s


def decode_sign1(
    base: torch.Tensor,
    packed: torch.Tensor,
    scale: float,
    out_dtype: torch.dtype,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    threads: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reconstruct a fine-tuned matrix from the base, packed signs and scale.

    THE reconstruction formula (bit-exact; :func:`reference_decode_sign1` is the naive
    implementation and tests check ``torch.equal`` against it)::

        s   = torch.tensor(scale, dtype=torch.float32)            # fp32 scale
        S   = unpack_signs(packed, K, torch.float32)              # {-1, +1}, [N, K]
        out = (base.to(torch.float32) + s * S).to(out_dtype)

    i.e. elementwise in fp32 (``s * S`` is exactly ``+-s``), one fp32 addition, then a
    single rounding to ``out_dtype`` (round-to-nearest-even, torch's ``.to``).

    Implementation (hot path of materialize): row blocks of packed bytes are expanded to
    ``int8`` signs with a 256-entry int64 table (:func:`deltahub.codec.packing.gather_signs`);
    then, per cache-sized tile, the signs are widened to fp32, the base tile is widened
    into an fp32 accumulator, ``acc.add_(signs, alpha=s)`` adds ``+-s`` exactly, and the
    accumulator is cast into the preallocated output. Tiles hold at most 256K elements;
    torch's intra-op threads parallelise each op (``threads=N`` spreads tiles over N worker
    threads instead). Temporaries: a few MiB per worker, never more than about
    ``chunk_bytes`` per worker.

    Args:
        base: ``[N, K]`` fp32/fp16/bf16 CPU tensor.
        packed: ``torch.int32`` ``[N, ceil(K/32)]`` packed signs (layout v1).
        scale: the scale (rounded to fp32 if it is not exactly representable).
        out_dtype: floating dtype of the result.
        chunk_bytes: bound on temporaries (per worker thread), in bytes.
        threads: worker threads over tiles (default 1: the calling thread, with torch's own
            intra-op threads inside each op).
            The result does not depend on it.
        out: optional ``[N, K]`` CPU tensor of ``out_dtype`` to write into (e.g. a reused
            or already-mapped buffer: a fresh ``torch.empty`` output costs page faults that
            can take as long as the decode itself). It may be ``base`` itself (in-place
            decode) but must not otherwise overlap ``base``.

    Returns:
        ``[N, K]`` tensor of ``out_dtype`` (``out`` when given).

    Raises:
        CodecError: bad base, packed dtype/shape, scale or out_dtype.
    """
    s_t = _check_decode_args(base, packed, scale, out_dtype)
    s = float(s_t)  # exactly the fp32 scale; as ``alpha`` it is cast back to fp32 exactly
    n, k = base.shape
    if out is None:
        out = torch.empty((n, k), dtype=out_dtype)
    elif not isinstance(out, torch.Tensor) or out.shape != (n, k) or out.dtype != out_dtype \
            or out.device.type != "cpu":
        raise CodecError(
            f"out must be a CPU tensor [{n}, {k}] of {out_dtype}, got "
            f"{getattr(out, 'dtype', type(out).__name__)} {list(getattr(out, 'shape', []))}"
        )
    if n == 0 or k == 0:
        return out
    w = packed.shape[1]
    nbytes = w * (WORD_BITS // 8)
    wide = w * WORD_BITS
    packed_bytes = packed.contiguous().view(torch.uint8)  # [N, 4W]
    direct = out_dtype == torch.float32  # accumulate straight into the output
    base_f32 = base.dtype == torch.float32

    # Tile rows: fp32 signs + fp32 accumulator per tile row.
    tile_row_bytes = k * 4 * (1 if direct else 2)
    tile_rows = max(1, min(_SERIAL_ELEMS // k, chunk_bytes // tile_row_bytes))
    # Block rows (a multiple of tile_rows): int32 indices + int64 signs per block row.
    block_row_bytes = nbytes * (4 + 8)
    tiles_per_block = max(
        1,
        min(_SERIAL_ELEMS // (nbytes * tile_rows), chunk_bytes // (block_row_bytes * tile_rows)),
    )
    block_rows = min(n, tile_rows * tiles_per_block)
    tile_rows = min(tile_rows, block_rows)
    n_blocks = (n + block_rows - 1) // block_rows

    # Views of every tile, made once (cheaper than slicing in the loop).
    base_tiles = base.split(tile_rows)
    out_tiles = out.split(tile_rows)

    def work(queue: _BlockQueue) -> None:
        idx_buf = torch.empty(block_rows * nbytes, dtype=torch.int32)
        sgn_buf = torch.empty(block_rows * nbytes, dtype=torch.int64)
        sf_full = torch.empty((tile_rows, k), dtype=torch.float32)
        acc_full = None if direct else torch.empty((tile_rows, k), dtype=torch.float32)
        while (b := queue.take()) is not None:
            b0 = b * block_rows
            b1 = min(n, b0 + block_rows)
            m = (b1 - b0) * nbytes
            idx = idx_buf[:m]
            idx.copy_(packed_bytes[b0:b1].reshape(-1))
            sgn = gather_signs(idx, out=sgn_buf[:m])
            signs8 = sgn.view(torch.int8).view(b1 - b0, wide)[:, :k]  # +-1, int8
            t0 = b0 // tile_rows
            for t, sig in enumerate(signs8.split(tile_rows), start=t0):
                r = sig.shape[0]
                sf = sf_full if r == tile_rows else sf_full[:r]
                sf.copy_(sig)  # +-1, fp32
                out_tile = out_tiles[t]
                if acc_full is None:
                    acc = out_tile
                else:
                    acc = acc_full if r == tile_rows else acc_full[:r]
                if base_f32:
                    torch.add(base_tiles[t], sf, alpha=s, out=acc)
                else:
                    acc.copy_(base_tiles[t])  # exact widening to fp32
                    acc.add_(sf, alpha=s)  # + (+-s): exact product, one fp32 rounding
                if acc_full is not None:
                    out_tile.copy_(acc)  # the single rounding to out_dtype

    _run_blocks(n_blocks, _workers(n_blocks, n * k, k, threads), work)
    return out


def reference_decode_sign1(
    base: torch.Tensor,
    packed: torch.Tensor,
    scale: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Naive, unchunked implementation of the :func:`decode_sign1` formula (for tests).

    Args/returns as :func:`decode_sign1`; uses ``O(N*K)`` fp32 temporaries.
    """
    s = _check_decode_args(base, packed, scale, out_dtype)
    k = base.shape[1]
    signs = unpack_signs(packed, k, torch.float32)
    return (base.to(torch.float32) + s * signs).to(out_dtype)


class Sign1Codec(TensorCodec):
    """Codec ``sign1`` (v1): BitDelta. Part ``signs``: int32 ``[N, ceil(K/32)]`` packed signs of
    ``Δ = W_ft − W_base`` (layout v1); parameter ``scale``: fp32 ``mean|Δ|`` (trainable).
    Decoding: ``(W_base.float() + scale·S).to(D)``, exact (:func:`decode_sign1`)."""

    name = "sign1"
    version = 1
    part_names = ("signs",)
    uses_base = True
    checks_finite = True
    trainable_params = ("scale",)

    def encode(self, base: torch.Tensor | None, finetuned: torch.Tensor, **options: object) -> Encoded:
        if base is None:
            raise CodecError("codec sign1 needs the base tensor")
        enc = encode_sign1(base, finetuned)
        norm = enc.stats.rel_delta_norm
        return Encoded(
            parts={"signs": enc.packed},
            params={"scale": enc.scale},
            rel_recon_error=enc.rel_recon_error,
            rel_delta_norm=norm if math.isfinite(norm) else None,
        )

    def check_params(self, params: Mapping[str, JSONValue], shape: tuple[int, ...]) -> dict[str, JSONValue]:
        if len(shape) != 2:
            raise CodecError("a sign1 tensor must be 2-D")
        extra = sorted(set(params) - {"scale"})
        if extra:
            raise CodecError(f"sign1 has no parameter {extra[0]!r}")
        scale = params.get("scale")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not -_FP32_MAX <= scale <= _FP32_MAX:
            raise CodecError("a sign1 tensor needs a finite fp32 scale")  # (NaN fails the comparison)
        return {"scale": float(scale)}

    def part_specs(self, shape: tuple[int, ...], dtype: torch.dtype,
                   params: Mapping[str, JSONValue]) -> dict[str, PartSpec]:
        if not dtype.is_floating_point:
            raise CodecError(f"a sign1 tensor must be floating point, not {dtype}")
        return {"signs": PartSpec(torch.int32, packed_shape(*shape))}

    def decode(self, base: torch.Tensor | None, parts: Mapping[str, torch.Tensor], params: Mapping[str, JSONValue],
               out_dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        if base is None or "signs" not in parts:
            raise CodecError("codec sign1 needs the base tensor and its part 'signs'")
        return decode_sign1(base, parts["signs"], float(params["scale"]), out_dtype, out=out)

    def rescaled_error(self, params: Mapping[str, JSONValue], initial: Mapping[str, JSONValue],
                       known: Mapping[str, JSONValue], known_error: float | None) -> float | None:
        return recon_error_at(float(params["scale"]), float(initial["scale"]), float(known["scale"]), known_error)

    def planes_layout(self, shape: tuple[int, ...], params: Mapping[str, JSONValue]) -> PlanesLayout | None:
        return PlanesLayout(1, 1, None) if len(shape) == 2 else None

    def operator(self, parts: Mapping[str, torch.Tensor], params: Mapping[str, JSONValue],
                 shape: tuple[int, ...]) -> DeltaOperator:
        from .sign_apply import SignOperator

        return SignOperator(parts["signs"], float(params["scale"]), shape[1])


def recon_error_at(new: float, initial: float, known: float, known_error: float | None) -> float | None:
    """``|Δ − new·S| / |Δ|`` from the error ``known_error`` at scale ``known``.

    With ``S = sign(Δ)`` and ``initial = mean|Δ|``: ``|Δ − s·S|² = |Δ|² − 2s·N·initial + s²·N``, so
    ``e(s)² = 1 − (2s·initial − s²)·c`` where ``c = N/|Δ|²`` follows from any known ``(s, e(s))``.
    Exact up to the fp32 rounding of the stored mean.
    """
    if known_error is None or not initial > 0:
        return None
    denom = known * (2 * initial - known)
    if not denom > 0:
        return None
    c = (1.0 - known_error**2) / denom
    return math.sqrt(max(0.0, 1.0 - (2 * new * initial - new * new) * c))
