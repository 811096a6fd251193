"""`nodeagent demo`: the main job on a bundled image, no root and no disk needed.

Restores the bundled demo image (an MBR disk with an ext4 and a swap partition) into a file, checks it against the
checksums recorded when the image was made, saves that file again (filesystem-aware), restores the new image and
checks that both restores are identical.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .. import resources
from ..errors import ChecksumError
from ..info import describe
from ..io.image import restore
from ..io.save import save
from ..io.sources import FileSource
from ..io.target import Target
from ..progress import Progress

MiB = 1 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            h.update(piece)
    return h.hexdigest()


def _restore(image: Path, disk: Path) -> None:
    disk.unlink(missing_ok=True)  # a new file: free space reads as zeros, as when the checksums were taken
    source = FileSource(str(image))
    try:
        target = Target(str(disk))
        try:
            result = restore(source, target, progress=Progress("written", quiet=True, command="demo"))
        finally:
            target.close()
    finally:
        source.close()
    print(f"  restored {image.name} -> {disk}: {result.chunks} chunks, {result.data_bytes / MiB:.1f} MiB written")


def run_demo(folder: str) -> int:
    expected = json.loads(resources.read_bytes("demo/demo.json"))
    work = Path(folder)
    work.mkdir(parents=True, exist_ok=True)
    image = work / "demo.ndz"  # the bundled image, copied out: the static binary carries it inside itself
    image.write_bytes(resources.read_bytes("demo/demo.ndz"))
    print(f"nodeagent demo in {work}/: {expected['what']}")

    print("1. the bundled image:")
    for line in list(describe(str(image)))[:1]:
        print(f"  {line}")
    disk = work / "disk.img"
    _restore(image, disk)
    if _sha256(disk) != expected["disk_sha256"]:
        raise ChecksumError(f"{disk} does not match the demo image's recorded checksum")
    print(f"  sha256 matches the recorded one: {expected['disk_sha256'][:16]}...")

    print("2. save the restored disk (filesystem-aware):")
    resaved = work / "resaved.ndz"
    result = save(str(disk), str(resaved), progress=Progress("read", quiet=True, command="demo"))
    for part in result.map.parts:
        print(
            f"  partition {part.index}: {part.kind}, {part.allocated * 512 / MiB:.1f} of {part.count * 512 / MiB:.1f} MiB imaged"
        )
    print(
        f"  {resaved}: {result.chunks} chunk(s), {result.data_bytes / MiB:.1f} MiB of data in a "
        f"{result.image_bytes / MiB:.1f} MiB image (disk {result.disk_bytes / MiB:.0f} MiB)"
    )

    print("3. restore the new image and compare:")
    again = work / "disk-again.img"
    _restore(resaved, again)
    if _sha256(again) != expected["disk_sha256"]:
        raise ChecksumError(f"{again} differs from {disk}: save and restore did not round-trip")
    print("  identical to the first restore")
    os.sync()
    print(f"demo OK. Try: nodeagent info {resaved}   |   sudo nodeagent image {resaved} /dev/sdX")
    return 0
