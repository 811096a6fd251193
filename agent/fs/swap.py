"""Linux swap: only the header page matters; the rest is scratch space that a restored node does not need."""

from __future__ import annotations

from agent.fs.ranges import Range
from agent.fs.window import SECTOR, Window

SIGNATURES = (b"SWAPSPACE2", b"SWAP-SPACE")  # new-style (v1) and old-style (v0) swap
PAGE_SIZES = (4096, 8192, 16384, 65536)  # the signature ends the first page, whatever the page size
KEEP_SECTORS = 64  # 32 KiB, as the real imagezip keeps of a swap partition


def header_page_size(win: Window) -> int | None:
    """The page size whose last 10 bytes hold the swap signature, or None if this is not swap."""
    for page in PAGE_SIZES:
        if win.size >= page and win.read(page - 10, 10) in SIGNATURES:
            return page
    return None


def probe(win: Window) -> bool:
    return header_page_size(win) is not None


def scan(win: Window) -> tuple[str, list[Range], int]:
    """('swap', ranges, sectors described): the first 64 sectors, or the whole header page if pages are
    larger; the swap area is the whole window."""
    page = header_page_size(win) or 0
    keep = min(max(KEEP_SECTORS, page // SECTOR), win.sectors)
    return "swap", [(0, keep)], win.sectors
