"""Compress and decompress the data stream of one chunk, pure and bounded.

Decompression yields the chunk's data in pieces of bounded size, so a chunk of zeros that inflates 1000-fold
never sits in memory whole. zlib and zstandard release the GIL while they work, so callers can run chunks on
several threads.

Compression works on *pieces* (64 KiB of input each for zlib) that can be compressed independently on any thread and
then concatenated into one chunk's stream, the way pigz builds one gzip stream on many cores:
- zlib: each piece is a raw deflate run ended by a sync flush (byte-aligned, not final), primed with the 32 KiB of
  input before it as dictionary, so compression is as good as one continuous stream. A chunk's stream is then a zlib
  header, the pieces, an empty final block and the Adler-32 of all the input: an ordinary RFC 1950 stream that the
  real imageunzip inflates in one go.
- zstd: each piece is a complete zstd frame; a chunk's stream is frames back to back (our extension, read only by
  us).
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Iterator

from ..errors import ImageFormatError

PIECE_OUT = 1 << 20  # most inflated bytes handed out at once
INPUT_SLICE = 128 << 10
ONE_SHOT_MAX = 8 << 20  # chunks inflating to at most this go in one (bounded) call
ZSTD_MAX_WINDOW = 8 << 20  # our frames are 64 KiB pieces; a frame asking for more window memory is refused
ZLIB_WINDOW = 32 << 10

_FINAL_EMPTY_BLOCK = b"\x03\x00"  # BFINAL=1, fixed Huffman, end-of-block: what zlib writes for Z_FINISH after a flush
_local = threading.local()  # zstandard's contexts are not thread-safe: one per thread


def _zstandard():
    """zstandard, imported when a zstd image is first met: most images are zlib, and its import (which pulls in
    platform) is a tenth of the static binary's start-up."""
    import zstandard

    return zstandard


def _zstd_dctx():
    if not hasattr(_local, "dctx"):
        _local.dctx = _zstandard().ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    return _local.dctx


def decompress(codec: str, data: bytes | memoryview, expected: int, index: int | str = "?") -> Iterator[bytes]:
    """Yield the inflated stream in pieces of at most PIECE_OUT bytes, exactly `expected` bytes in all.

    Raises ImageFormatError naming the chunk if the stream is corrupt, ends early, or holds more than `expected`.
    """
    if codec == "zlib":
        yield from _inflate_zlib(data, expected, index)
    elif codec == "zstd":
        yield from _inflate_zstd(data, expected, index)
    else:
        raise ImageFormatError(f"chunk {index}: unknown compression {codec}")


def _inflate_zlib(data, expected: int, index) -> Iterator[bytes]:
    if expected <= ONE_SHOT_MAX:
        # The common case, in one call. Bounded at one byte more than the regions describe, so a stream that lies
        # about its size (a zip bomb: 512 bytes claimed, 1000 MiB inside) is caught before it takes the memory.
        inflater = zlib.decompressobj()
        try:
            out = inflater.decompress(data, expected + 1)
        except zlib.error as err:
            raise ImageFormatError(f"chunk {index}: corrupt zlib stream ({err})") from None
        if len(out) > expected:
            raise ImageFormatError(f"chunk {index}: compressed stream holds more than the {expected} bytes its regions describe")
        if not inflater.eof:
            raise ImageFormatError(f"chunk {index}: zlib stream ends early (truncated chunk?)")
        if len(out) != expected:
            raise ImageFormatError(f"chunk {index}: stream inflates to {len(out)} bytes, its regions describe {expected}")
        yield out
        return
    inflater = zlib.decompressobj()
    produced = 0
    view = memoryview(data)
    try:
        # Input goes in slices, so that what is left over after a bounded call (unconsumed_tail, a copy) stays small.
        for at in range(0, len(view), INPUT_SLICE):
            pending = view[at : at + INPUT_SLICE]
            while pending:
                # One byte more than is still owed, to notice a stream longer than its header says.
                piece = inflater.decompress(pending, min(PIECE_OUT, expected - produced + 1))
                produced += len(piece)
                if produced > expected:
                    raise ImageFormatError(f"chunk {index}: compressed stream holds more than the {expected} bytes its regions describe")
                if piece:
                    yield piece
                if inflater.eof:
                    break
                pending = inflater.unconsumed_tail
            if inflater.eof:
                break
    except zlib.error as err:
        raise ImageFormatError(f"chunk {index}: corrupt zlib stream ({err})") from None
    if not inflater.eof:
        raise ImageFormatError(f"chunk {index}: zlib stream ends early (truncated chunk?)")
    if produced != expected:
        raise ImageFormatError(f"chunk {index}: stream inflates to {produced} bytes, its regions describe {expected}")
    stream_end = min(at + INPUT_SLICE, len(view)) - len(inflater.unused_data)
    if bytes(view[stream_end:]).strip(b"\0"):
        raise ImageFormatError(f"chunk {index}: {len(view) - stream_end} stray bytes after the compressed stream")


def _inflate_zstd(data, expected: int, index) -> Iterator[bytes]:
    produced = 0
    try:
        with _zstd_dctx().stream_reader(data, read_across_frames=True) as reader:
            while True:
                piece = reader.read(min(PIECE_OUT, expected - produced + 1))
                if not piece:
                    break
                produced += len(piece)
                if produced > expected:
                    raise ImageFormatError(f"chunk {index}: compressed stream holds more than the {expected} bytes its regions describe")
                yield piece
    except _zstandard().ZstdError as err:
        raise ImageFormatError(f"chunk {index}: corrupt zstd stream ({err})") from None
    if produced != expected:
        raise ImageFormatError(f"chunk {index}: stream inflates to {produced} bytes, its regions describe {expected}")


# --- compression -------------------------------------------------------------------------------------------------


def zlib_header(level: int) -> bytes:
    """The two-byte RFC 1950 header zlib writes for `level` (the level bits are informational)."""
    flevel = 0 if level < 2 else 1 if level < 6 else 2 if level == 6 else 3
    cmf = 0x78  # deflate, 32 KiB window
    flg = flevel << 6
    flg += 31 - (cmf * 256 + flg) % 31
    return bytes((cmf, flg))


def compress_piece(codec: str, level: int, data: bytes | memoryview, dictionary: bytes = b"") -> bytes:
    """Compress one piece so that pieces can be concatenated into a chunk's stream (see the module doc)."""
    if codec == "zlib":
        if dictionary:
            deflater = zlib.compressobj(level, zlib.DEFLATED, -15, zdict=dictionary[-ZLIB_WINDOW:])
        else:
            deflater = zlib.compressobj(level, zlib.DEFLATED, -15)
        return deflater.compress(data) + deflater.flush(zlib.Z_SYNC_FLUSH)
    return _zstandard().ZstdCompressor(level=level).compress(data)


def piece_bound(codec: str, n: int) -> int:
    """An upper bound on compress_piece's output for n input bytes (stored blocks / raw zstd blocks worst case)."""
    if codec == "zlib":
        return n + 5 * (n // 16383 + 1) + 16
    return n + (n >> 8) + 3 * (n // (128 << 10) + 1) + 32


def stream_overhead(codec: str) -> int:
    """Bytes a chunk's stream adds around its pieces."""
    return 2 + len(_FINAL_EMPTY_BLOCK) + 4 if codec == "zlib" else 0


def assemble(codec: str, level: int, pieces: list[bytes], adler: int) -> bytes:
    """Join compressed pieces into one chunk stream; `adler` is the Adler-32 of all their input (zlib only)."""
    if codec == "zlib":
        return b"".join([zlib_header(level), *pieces, _FINAL_EMPTY_BLOCK, adler.to_bytes(4, "big")])
    return b"".join(pieces)


_ADLER_MOD = 65521


def adler32_combine(adler1: int, adler2: int, len2: int) -> int:
    """Adler-32 of A+B from adler32(A), adler32(B) and len(B) (the arithmetic of zlib's adler32_combine)."""
    rem = len2 % _ADLER_MOD
    sum1 = adler1 & 0xFFFF
    sum2 = (rem * sum1) % _ADLER_MOD
    sum1 += (adler2 & 0xFFFF) + _ADLER_MOD - 1
    sum2 += (adler1 >> 16) + (adler2 >> 16) + _ADLER_MOD - rem
    sum1 %= _ADLER_MOD
    sum2 %= _ADLER_MOD
    return sum1 | (sum2 << 16)
