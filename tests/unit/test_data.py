"""Data behaviour without servers: image checks, sources, hashing splits, the cache, the dataset."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from tests.factories import add_broken_files, png_bytes, write_image_folder
from tirelib.data import (
    MAX_SUMMARY_BYTES,
    Manifest,
    ManifestSummary,
    Record,
    Skipped,
    SplitManifest,
    TireImageDataset,
    assign_split,
    check_image,
    class_order,
    make_splits,
    parse_ratios,
    scan_source,
    validate_name,
)
from tirelib.errors import DataError
from tirelib.storage import ContentCache

pytestmark = pytest.mark.unit


def _manifest(counts: dict[str, int], version: str = "v1") -> Manifest:
    records = []
    index = 0
    for label, count in counts.items():
        for _ in range(count):
            data = png_bytes(index, label=label)
            sha = hashlib.sha256(data).hexdigest()
            records.append(Record(f"raw/{version}/{label}/{index}.png", label, sha, len(data)))
            index += 1
    return Manifest(version, "2026-01-01T00:00:00Z", records)


@pytest.mark.parametrize("name", ["v1", "2026-11-24", "split_1", "A.b-c_d"])
def test_valid_names_pass(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "-v1", ".hidden", "a/b", "v 1", "über", "v1/"])
def test_invalid_names_name_the_rule(name: str) -> None:
    with pytest.raises(DataError, match="letters, digits"):
        validate_name(name)


def test_check_image_tells_why(tmp_path: Path) -> None:
    assert check_image(png_bytes(1)) is None
    expected = add_broken_files(tmp_path)
    for name, reason in expected.items():
        if name.startswith("."):
            continue
        assert reason in (check_image((tmp_path / name).read_bytes()) or "")


def test_scan_folder_skips_broken_and_hidden_files_and_keeps_the_rest(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"good": 5, "defective": 4})
    expected = add_broken_files(tmp_path / "defective")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref")
    images, skipped, kind = scan_source(tmp_path)
    assert kind == "folder"
    assert Counter(i.label for i in images) == {"good": 5, "defective": 4}
    reasons = {s.path.rsplit("/", 1)[-1]: s.reason for s in skipped}
    for name, reason in expected.items():
        assert reason in reasons[name]
    assert all(i.sha256 == hashlib.sha256(i.path.read_bytes()).hexdigest() for i in images)


def test_annotation_source_reads_the_earlier_format(tmp_path: Path) -> None:
    paths = write_image_folder(tmp_path / "imgs", {"good": 2, "defective": 2})
    other = tmp_path / "other" / paths["good"][0].name  # same name, other bytes
    other.parent.mkdir()
    other.write_bytes(png_bytes(500, label="good"))
    data = [
        {"FilePath": str(p.relative_to(tmp_path)), "label_value": label}
        for label, items in paths.items()
        for p in items
    ]
    data += [
        {"FilePath": str(other), "label_value": "good"},
        {"FilePath": "imgs/missing.png", "label_value": "good"},
        {"label_value": "good"},
    ]
    annotation = tmp_path / "annotation.json"
    annotation.write_text(json.dumps({"annotation": {"data": data}}))
    images, skipped, kind = scan_source(annotation)
    assert kind == "annotation"
    assert Counter(i.label for i in images) == {"good": 3, "defective": 2}
    assert len({(i.label, i.name) for i in images}) == 5  # the name clash was resolved
    assert {s.reason for s in skipped} == {"file not found", "no FilePath or label_value"}


def test_annotation_that_is_not_one_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "a.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="not an annotation file"):
        scan_source(bad)


def test_source_without_class_folders_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(png_bytes(0))
    with pytest.raises(DataError, match="no class folders"):
        scan_source(tmp_path)


def test_split_depends_on_content_only() -> None:
    shas = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(3000)]
    first = [assign_split(s) for s in shas]
    assert first == [assign_split(s) for s in shas]
    shares = Counter(first)
    assert 0.65 < shares["train"] / 3000 < 0.75
    assert 0.12 < shares["test"] / 3000 < 0.18


def test_an_image_keeps_its_split_as_versions_grow() -> None:
    first = _manifest({"good": 60, "defective": 60}, "v1")
    more = _manifest({"defective": 150, "good": 150}, "v2")  # other images, other order
    small = make_splits(first)
    large = make_splits(Manifest("v2", first.created_at, more.records + first.records))
    where = {r.sha256: s for s, m in large.items() for r in m.records}
    for split, manifest in small.items():
        assert all(where[r.sha256] == split for r in manifest.records)


def test_splits_are_stratified_and_complete() -> None:
    manifest = _manifest({"good": 300, "defective": 200})
    splits = make_splits(manifest)
    assert sum(len(m.records) for m in splits.values()) == 500
    for m in splits.values():
        share = m.counts["good"] / len(m.records)
        assert 0.45 < share < 0.75
        assert m.classes == ["good", "defective"]


def test_one_label_is_refused() -> None:
    with pytest.raises(DataError, match="at least two"):
        make_splits(_manifest({"good": 50}))


def test_too_few_images_is_refused_with_counts() -> None:
    with pytest.raises(DataError, match=r"too small to split .* has 0 '"):
        make_splits(_manifest({"good": 3, "defective": 3}))


def test_one_image_under_two_labels_is_refused() -> None:
    manifest = _manifest({"good": 40, "defective": 40})
    twin = manifest.records[0]
    manifest.records.append(Record("raw/v1/defective/twin.png", "defective", twin.sha256, 1))
    with pytest.raises(DataError, match="more than one label"):
        make_splits(manifest)


@pytest.mark.parametrize("text", ["0.7,0.3", "0.8,0.15,0.15", "a,b,c", "1,0,0", "-0.1,0.6,0.5"])
def test_bad_ratios_are_refused(text: str) -> None:
    with pytest.raises(DataError, match="ratios"):
        parse_ratios(text)


def test_class_order_puts_good_first() -> None:
    assert class_order(["defective", "good", "bulge"]) == ["good", "bulge", "defective"]


def test_manifests_round_trip() -> None:
    manifest = _manifest({"good": 2, "defective": 1})
    assert Manifest.from_json(json.loads(json.dumps(manifest.to_json()))) == manifest
    split = SplitManifest("v1", "test", ["good", "defective"], manifest.records)
    assert SplitManifest.from_json(split.to_json()) == split
    with pytest.raises(DataError, match="malformed"):
        Manifest.from_json({"version": "v1"})


def test_manifest_files_hold_the_same_document_and_decode_straight_to_records() -> None:
    manifest = _manifest({"good": 3, "defective": 2})
    manifest.skipped.append(Skipped("good/notes.txt", "not an image"))
    data = manifest.to_bytes()
    assert json.loads(data) == json.loads(json.dumps(manifest.to_json()))
    assert data.startswith(b'{\n "created_at"')  # indented, keys sorted, as before
    decoded = Manifest.from_bytes(data)
    assert decoded == manifest and all(type(r) is Record for r in decoded.records)
    split = SplitManifest("v1", "test", ["good", "defective"], manifest.records, (0.6, 0.2, 0.2))
    assert SplitManifest.from_bytes(split.to_bytes()) == split
    assert json.loads(split.to_bytes()) == json.loads(json.dumps(split.to_json()))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b'{"version": "v1"}', "missing required field `created_at`"),
        (b'{"version": "v1", "created_at": "t", "objects": [{"key": 1}]}', r"\$.objects\[0\].key"),
        (b"not json", "malformed"),
    ],
)
def test_a_malformed_manifest_file_is_refused_naming_the_problem(data: bytes, message: str) -> None:
    with pytest.raises(DataError, match=message):
        Manifest.from_bytes(data, "s3://b/raw/v1/_manifest.json")


def test_a_summary_rides_in_metadata_unless_too_large() -> None:
    manifest = _manifest({"good": 3, "defective": 2})
    summary = manifest.summary()
    assert ManifestSummary.from_metadata(summary.to_metadata()) == summary
    assert ManifestSummary.from_bytes(manifest.to_bytes()) == summary
    many = ManifestSummary("t", {f"label-{i:03d}": i for i in range(200)}, 0)
    assert many.to_metadata() == {}  # over S3's 2 KB of metadata: listed from the file
    assert len(json.dumps(many.counts)) > MAX_SUMMARY_BYTES
    assert ManifestSummary.from_metadata({"tire-summary": "{broken"}) is None


def test_duplicates_count_once_in_the_splits_by_their_first_key() -> None:
    manifest = _manifest({"good": 40, "defective": 40})
    first = min(manifest.records, key=lambda r: r.key)
    manifest.records.append(Record("raw/v1/zz-copy.png", first.label, first.sha256, first.size))
    splits = make_splits(manifest)
    kept = [r for s in splits.values() for r in s.records]
    assert len(kept) == 80 and first in kept


def test_cache_verifies_and_is_atomic(tmp_path: Path) -> None:
    cache = ContentCache(tmp_path)
    data = png_bytes(7)
    sha = hashlib.sha256(data).hexdigest()
    path = cache.put(sha, data)
    assert cache.has(sha) and path.read_bytes() == data
    with pytest.raises(DataError, match="checksum mismatch"):
        cache.put("0" * 64, data, source="s3://b/k")
    assert not cache.has("0" * 64)
    assert not list(tmp_path.rglob(".part-*"))


def test_dataset_reads_from_the_cache(tmp_path: Path) -> None:
    cache = ContentCache(tmp_path)
    records = []
    for index, label in enumerate(["good", "defective", "good"]):
        data = png_bytes(index, size=6, label=label)
        sha = hashlib.sha256(data).hexdigest()
        cache.put(sha, data)
        records.append(Record(f"raw/v/{label}/{index}.png", label, sha, len(data)))
    dataset = TireImageDataset(records, ["good", "defective"], cache, transform=lambda im: im.size)
    assert len(dataset) == 3
    assert dataset[1] == ((6, 6), 1)
    assert dataset.targets == [0, 1, 0]
    missing = TireImageDataset(
        [Record("raw/v/good/x.png", "good", "f" * 64, 1)], ["good", "defective"], cache
    )
    with pytest.raises(DataError, match="not in the cache"):
        missing[0]
    with pytest.raises(DataError, match="not among the classes"):
        TireImageDataset(records, ["good"], cache)
