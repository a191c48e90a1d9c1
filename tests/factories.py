"""Small, fast test data: distinct tiny images in class folders, and broken files."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image


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
