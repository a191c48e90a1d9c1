"""Small, fast test data: distinct tiny images in class folders, broken files, and an upload
the way any S3 client makes one."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import boto3
import numpy as np
from botocore.config import Config
from PIL import Image

from tirelib.settings import Settings


def png_bytes(index: int, size: int = 8, label: str = "good") -> bytes:
    """A tiny PNG whose pixels encode ``index`` and ``label``, so every image is distinct."""
    shade = 40 if label == "good" else 200
    image = Image.new("RGB", (size, size), (shade, index % 256, (index // 256) % 256))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_image_folder(
    root: Path, counts: dict[str, int], *, size: int = 8, start: int = 0
) -> dict[str, list[Path]]:
    """Write ``counts[label]`` distinct PNGs into ``root/<label>/``; return the paths by label."""
    paths: dict[str, list[Path]] = {}
    index = start
    for label, count in counts.items():
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            path = folder / f"img_{index:05d}.png"
            path.write_bytes(png_bytes(index, size, label))
            paths.setdefault(label, []).append(path)
            index += 1
    return paths


def add_broken_files(label_dir: Path) -> dict[str, str]:
    """A zero-byte file, a truncated PNG, a text file named .png and a hidden file."""
    good = png_bytes(99_999, 32)
    files = {
        "empty.png": b"",
        "truncated.png": good[: len(good) // 2],
        "notes.png": b"this is not an image\n",
        ".DS_Store": b"\x00\x01binary junk",
    }
    for name, data in files.items():
        (label_dir / name).write_bytes(data)
    return {
        "empty.png": "zero-byte file",
        "truncated.png": "not decodable",
        "notes.png": "not an image",
        ".DS_Store": "hidden file",
    }


def upload_with_boto3(
    settings: Settings, src: Path, version: str, extra: dict[str, bytes] | None = None
) -> int:
    """Put every file of ``src/<label>/`` under ``raw/<version>/`` with plain boto3 calls, as
    ``aws s3 sync`` or a camera gateway would: no manifest. ``extra`` maps more keys below
    ``raw/<version>/`` to their bytes. Returns the number of files put from ``src``."""
    client = boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        aws_access_key_id=settings.aws_access_key_id,
        aws_secret_access_key=(
            settings.aws_secret_access_key.get_secret_value()
            if settings.aws_secret_access_key
            else None
        ),
        region_name=settings.aws_default_region,
        config=Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )
    files = sorted(p for p in src.rglob("*") if p.is_file())
    for path in files:
        key = f"raw/{version}/{path.relative_to(src).as_posix()}"
        client.put_object(Bucket=settings.data_bucket, Key=key, Body=path.read_bytes())
    for name, data in (extra or {}).items():
        client.put_object(Bucket=settings.data_bucket, Key=f"raw/{version}/{name}", Body=data)
    return len(files)


def header_bomb(image: bytes, kind: str, width: int, height: int) -> bytes:
    """``image`` (a small valid PNG, GIF or JPEG) with a header declaring ``width`` x ``height``
    pixels: a decompression bomb that costs nothing to send."""
    data = bytearray(image)
    if kind == "PNG":  # IHDR: width and height, then the chunk's CRC
        data[16:24] = struct.pack(">II", width, height)
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    elif kind == "GIF":  # the logical screen and the first image descriptor
        data[6:10] = struct.pack("<HH", width, height)
        start = data.index(b"\x2c", 13)
        data[start + 5 : start + 9] = struct.pack("<HH", width, height)
    else:  # JPEG: the start-of-frame segment holds height, then width
        start = data.index(b"\xff\xc0")
        data[start + 5 : start + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG written chunk by chunk: grayscale for 2-D ``values``, RGB for H x W x 3."""
    height, width = values.shape[:2]
    colour = 0 if values.ndim == 2 else 2
    rows = values.reshape(height, -1).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0)
    image = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + image
