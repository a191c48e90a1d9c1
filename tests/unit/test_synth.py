"""The synthetic tire generator: determinism, layout, labels, defects and argument checks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tirelib.errors import ConfigurationError
from tirelib.synth import DEFECT_KINDS, SynthSummary, draw_tire, generate

pytestmark = pytest.mark.unit

SIZE = 32  # small images keep the tests fast; drawing is the same at every size


def pngs(root: Path) -> dict[str, bytes]:
    """Every PNG under ``root`` by its path relative to ``root``."""
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*.png")}


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    generate(tmp_path / "a", 6, seed=3, size=SIZE)
    generate(tmp_path / "b", 6, seed=3, size=SIZE)
    first, second = pngs(tmp_path / "a"), pngs(tmp_path / "b")
    assert len(first) == 6
    assert first == second


def test_different_seeds_give_different_images(tmp_path: Path) -> None:
    generate(tmp_path / "a", 4, seed=1, size=SIZE)
    generate(tmp_path / "b", 4, seed=2, size=SIZE)
    first, second = pngs(tmp_path / "a"), pngs(tmp_path / "b")
    assert first.keys() == second.keys()  # labels depend on the index only
    assert all(first[name] != second[name] for name in first)


def test_a_larger_count_keeps_the_first_images(tmp_path: Path) -> None:
    generate(tmp_path / "small", 5, seed=9, size=SIZE)
    generate(tmp_path / "large", 9, seed=9, size=SIZE)
    small, large = pngs(tmp_path / "small"), pngs(tmp_path / "large")
    assert len(large) == 9
    assert small == {name: large[name] for name in small}


@pytest.mark.parametrize(("count", "ratio"), [(10, 0.5), (12, 0.25), (7, 0.3)])
def test_layout_and_counts_follow_defect_ratio(tmp_path: Path, count: int, ratio: float) -> None:
    summary = generate(tmp_path, count, seed=0, size=SIZE, defect_ratio=ratio)
    defective = math.floor(count * ratio)
    assert summary == SynthSummary(tmp_path, {"good": count - defective, "defective": defective})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["defective", "good"]
    for label, expected in summary.counts.items():
        assert len(list((tmp_path / label).iterdir())) == expected
    names = sorted(Path(name).name for name in pngs(tmp_path))
    assert names == [f"tire_{index:06d}.png" for index in range(count)]


def test_every_file_is_a_png_of_the_requested_size(tmp_path: Path) -> None:
    generate(tmp_path, 4, seed=0, size=48)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            with Image.open(path) as image:
                assert image.format == "PNG"
                assert (image.mode, image.size) == ("RGB", (48, 48))
                image.load()  # decodes the whole file


def test_good_tires_vary(tmp_path: Path) -> None:
    """Good tires differ in more than noise, so global statistics cannot give the label away."""
    generate(tmp_path, 8, seed=0, size=SIZE)
    means = [
        np.asarray(Image.open(path), dtype=np.float32).mean()
        for path in (tmp_path / "good").iterdir()
    ]
    assert np.ptp(means) > 5.0


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_each_defect_changes_the_same_tire(kind: str) -> None:
    good = np.asarray(draw_tire(np.random.default_rng(5), 64, None), dtype=np.int16)
    again = np.asarray(draw_tire(np.random.default_rng(5), 64, None), dtype=np.int16)
    defective = np.asarray(draw_tire(np.random.default_rng(5), 64, kind), dtype=np.int16)
    assert np.array_equal(good, again)
    changed = np.abs(defective - good).max(axis=-1) > 20
    assert changed.mean() > 0.005, f"{kind} changed {changed.mean():.2%} of the pixels"


def test_draw_tire_returns_an_rgb_image_of_the_size() -> None:
    image = draw_tire(np.random.default_rng(0), 40, "crack")
    assert (image.mode, image.size) == ("RGB", (40, 40))


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"count": 0}, "count=0"),
        ({"count": -3}, "count=-3"),
        ({"size": 15}, "size=15"),
        ({"size": 1025}, "size=1025"),
        ({"defect_ratio": 0.0}, "defect_ratio=0.0"),
        ({"defect_ratio": 1.0}, "defect_ratio=1.0"),
        ({"defect_ratio": 1.5}, "defect_ratio=1.5"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, arguments: dict[str, float], named: str) -> None:
    values = {"count": 2, "size": SIZE, "defect_ratio": 0.5} | arguments
    with pytest.raises(ConfigurationError, match=named) as error:
        generate(
            tmp_path / "out",
            int(values["count"]),
            size=int(values["size"]),
            defect_ratio=values["defect_ratio"],
        )
    assert "allowed" in str(error.value)
    assert not (tmp_path / "out").exists()  # nothing is written before the arguments are checked


def test_unknown_defect_names_the_valid_kinds() -> None:
    with pytest.raises(ConfigurationError, match="scratch") as error:
        draw_tire(np.random.default_rng(0), SIZE, "scratch")
    assert all(kind in str(error.value) for kind in DEFECT_KINDS)
