"""Scale: a dataset version of 10,000 and of 100,000 small images through the data lake.

Each step runs as tirelib runs it, against a real local S3 server (SeaweedFS with credentials,
so every request is signed), one bucket per size:

- upload  ``upload_version`` (``tirelib data upload``): scan, check and hash the folder, send
          every image, write the manifest last
- ingest  ``ingest_version`` after the manifest is removed, as the pipeline's sensor ingests a
          version another S3 client sent: list, read and check every object, keep the bytes in
          the content cache, write the manifest
- list    ``list_versions`` (``tirelib data list``): every version with its state and counts
- split   ``split_version`` (``tirelib data split``): read the manifest, write three splits
- epoch   ``tirelib.train.load_data`` (the splits' three datasets, each image decoded from the
          cache into memory; ``--download``: the cache is emptied first, so every image is
          downloaded, as on a fresh training machine), then one pass over the training loader
          (the evaluation transform: loading, not augmentation, is measured; torch on one
          thread, as tensors of one small image gain nothing from more)

The images: a pool of ``--pool`` synthetic tires (``tirelib.synth``) at ``--side`` pixels,
each written many times as a distinct PNG (a ``tEXt`` chunk carrying its index is added), so
every file has its own sha256 and making 100,000 takes under a minute; the pixels repeat,
which costs nothing here. The smaller sources are hard links to the first files of the largest.

Each step of each size runs in a fresh Python process. Time is the step's own (after imports
and setup), per image of the version; CPU is the step's process (all threads) and the S3
server's, per image. Peak memory is the kernel's high-water mark of the process's resident
memory (``VmHWM``, started afresh by ``/proc/self/clear_refs`` just before the step), so numpy
and Pillow buffers count; it is shown whole and as what the step added to the memory resident
at its start (imports, torch included, are not the step's). ``ru_maxrss`` would not do: it
keeps the peak of the parent that forked the process. The ratios compare the largest
size with the smallest: time per image about 1.0 and step memory growing no faster than the
images (10x for 10x the images) mean linear cost.

Run:  .venv/bin/python bench/scale.py [--sizes 10000,100000] [--side 48] [--download]
About 15 minutes at the defaults on 2 CPUs; ``--sizes 2000,20000`` about 3.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import resource
import secrets
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

VERSION = "scale"
STEPS = ("upload", "ingest", "list", "split", "epoch")
STEP_HELP = {
    "upload": "tirelib data upload",
    "ingest": "ingest, into the cache",
    "list": "tirelib data list",
    "split": "tirelib data split",
    "epoch": "load_data + one pass",
}
ACCESS_KEY = "tirelib-bench"
MAX_SIZE = 1_000_000


# --- the images -----------------------------------------------------------------------------


def _with_index(png: bytes, index: int) -> bytes:
    """``png`` with a ``tEXt`` chunk ``index=<index>`` before ``IEND``: other bytes, same pixels."""
    iend = png.rindex(b"IEND") - 4  # the chunk's length field
    data = b"index\x00" + str(index).encode()
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data
    chunk += struct.pack(">I", zlib.crc32(chunk[4:]) & 0xFFFFFFFF)
    return png[:iend] + chunk + png[iend:]


def make_sources(work: Path, sizes: list[int], *, side: int, pool: int) -> dict[int, Path]:
    """``src-<n>/<label>/img_<i>.png`` for every size; the smaller ones link the larger's files."""
    from tirelib.synth import generate

    largest = max(sizes)
    base = work / "pool"
    generate(base, min(pool, largest), seed=1, size=side)
    pool_files = sorted(base.glob("*/*.png"), key=lambda p: p.name)
    templates = [(p.parent.name, p.read_bytes()) for p in pool_files]
    big = work / f"src-{largest}"
    for label in {label for label, _ in templates}:
        (big / label).mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    for index in range(largest):
        label, png = templates[index % len(templates)]
        path = big / label / f"img_{index:07d}.png"
        path.write_bytes(_with_index(png, index))
        files.append(path)
    sources = {largest: big}
    for n in sizes:
        if n == largest:
            continue
        src = work / f"src-{n}"
        for path in files[:n]:
            target = src / path.relative_to(big)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
        sources[n] = src
    return sources


# --- one step, in a process of its own ------------------------------------------------------


def _memory_mb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (its high-water mark) of this process, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Start the high-water mark afresh from the memory resident now (Linux 4.0 and later)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _cpu_seconds() -> float:
    """User and system CPU time of this process, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _measure(action: Callable[[], int]) -> dict[str, Any]:
    _reset_peak()  # the imports' own peak is not the step's
    rss = _memory_mb("VmRSS")
    cpu, start = _cpu_seconds(), time.perf_counter()
    items = action()
    return {
        "seconds": time.perf_counter() - start,
        "cpu_seconds": _cpu_seconds() - cpu,
        "items": items,
        "rss_start_mb": rss,
        "rss_peak_mb": _memory_mb("VmHWM"),
    }


def run_step(step: str, size: int, work: Path) -> dict[str, Any]:
    """Run ``step`` on the version of ``size`` images; the settings come from the environment."""
    from tirelib.data import ingest_version, list_versions, split_version, upload_version
    from tirelib.settings import get_settings
    from tirelib.storage import ContentCache, ObjectStore, manifest_key

    settings = get_settings()
    store = ObjectStore.for_data(settings)
    workers = settings.s3_max_workers
    cache = ContentCache(settings.resolved_cache_dir)
    action: Callable[[], int]

    if step == "upload":

        def action() -> int:
            report = upload_version(store, work / f"src-{size}", VERSION, max_workers=workers)
            return report.uploaded

    elif step == "ingest":
        store.delete([manifest_key(VERSION)])  # as if another S3 client had sent the images

        def action() -> int:  # as the sensor does it: the bytes read go into the cache
            report = ingest_version(store, VERSION, cache=cache, max_workers=workers)
            return sum(report.counts.values())

    elif step == "list":

        def action() -> int:
            (info,) = list_versions(store, max_workers=workers)
            return info.total

    elif step == "split":

        def action() -> int:
            return sum(len(s.records) for s in split_version(store, VERSION).values())

    else:  # epoch: the path training takes
        import torch

        from tirelib.config import TrainConfig
        from tirelib.train import load_data

        # Tensors of one small image gain nothing from intra-op threads, and on a busy machine
        # their hand-offs cost more than the work.
        torch.set_num_threads(1)
        side = int(os.environ["SCALE_SIDE"])
        config = TrainConfig(dataset_version=VERSION, image_size=side, augment=False)
        if os.environ.get("SCALE_DOWNLOAD") == "1":
            shutil.rmtree(cache.root, ignore_errors=True)  # a fresh machine: download all

        def action() -> int:
            loaders = load_data(config, store, cache, max_workers=workers, progress=False)
            seen = 0
            for images, _ in loaders.train:
                seen += int(images.shape[0])
            return seen

    return _measure(action)


def _step_main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING)
    result = run_step(args.step, args.size, Path(args.work))
    print(json.dumps(result))


# --- the driver -----------------------------------------------------------------------------


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of image counts: expected integers like 10000,100000"
        ) from None
    if (
        len(sizes) < 2
        or any(not 100 <= n <= MAX_SIZE for n in sizes)
        or len(set(sizes)) != len(sizes)
    ):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give at least two different image counts, each between 100 and "
            f"{MAX_SIZE:,}, like 10000,100000"
        )
    return sorted(sizes)


def _bounded(name: str, low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} {text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{name} {value} is outside {low}..{high}")
        return value

    return parse


def _server_cpu_seconds(pid: int) -> float:
    """User and system CPU time of the S3 server so far, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        type=_parse_sizes,
        default=_parse_sizes("10000,100000"),
        help="Image counts of the versions, comma-separated (default 10000,100000).",
    )
    parser.add_argument(
        "--side", type=_bounded("--side", 16, 256), default=48, help="Image side in pixels."
    )
    parser.add_argument(
        "--pool",
        type=_bounded("--pool", 2, 10_000),
        default=256,
        help="Distinct synthetic tires drawn; the files are variants of these.",
    )
    parser.add_argument(
        "--download",
        action="store_true",
        help="Empty the cache before the epoch, so it downloads every image.",
    )
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        _step_main(args)
        return

    from tirelib.settings import load_settings
    from tirelib.stack import create_buckets, free_port, seaweedfs_component

    load_start = os.getloadavg()
    began = time.perf_counter()
    sizes: list[int] = args.sizes
    results: dict[tuple[str, int], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="tire-scale-") as tmp:
        work = Path(tmp)
        secret = secrets.token_hex(16)
        server = load_settings(
            home=work / "home",
            s3_port=free_port(),
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=secret,
        )
        component = seaweedfs_component(server, buckets=[])
        try:
            component.up()
            endpoint = component.process.url
            record = component.process.read_pid_file()
            assert endpoint and record, "the S3 server did not start"
            local = server.model_copy(update={"s3_endpoint_url": endpoint})
            started = time.perf_counter()
            sources = make_sources(work, sizes, side=args.side, pool=args.pool)
            made = time.perf_counter() - started
            sample = sorted(sources[sizes[0]].glob("*/*.png"))[:100]
            mean_kb = sum(p.stat().st_size for p in sample) / len(sample) / 1024
            print(
                f"{max(sizes):,} images made in {made:.0f} s: variants of {args.pool} synthetic "
                f"tires at {args.side} px, {mean_kb:.1f} KB per PNG; SeaweedFS on 127.0.0.1; "
                f"{os.cpu_count()} CPUs, load average at start "
                + " ".join(f"{v:.2f}" for v in load_start),
                flush=True,
            )
            for n in sizes:
                bucket = f"scale-{n}"
                create_buckets(local, [bucket])
                env = {
                    **os.environ,
                    "TIRE_HOME": str(work / "home"),
                    "TIRE_S3_ENDPOINT_URL": endpoint,
                    "TIRE_DATA_BUCKET": bucket,
                    "TIRE_AWS_ACCESS_KEY_ID": ACCESS_KEY,
                    "TIRE_AWS_SECRET_ACCESS_KEY": secret,
                    "TIRE_CACHE_DIR": str(work / f"cache-{n}"),
                    "SCALE_SIDE": str(args.side),
                    "SCALE_DOWNLOAD": "1" if args.download else "0",
                }
                for step in STEPS:
                    server_cpu = _server_cpu_seconds(record.pid)
                    command = [sys.executable, __file__, "--step", step, "--size", str(n)]
                    done = subprocess.run(
                        [*command, "--work", str(work)],
                        env=env,
                        stdout=subprocess.PIPE,
                        text=True,
                        check=False,
                    )
                    if done.returncode != 0:
                        raise SystemExit(f"step {step} at {n:,} images failed ({done.returncode})")
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                    result["server_cpu_seconds"] = _server_cpu_seconds(record.pid) - server_cpu
                    results[(step, n)] = result
                    print(
                        f"  {step:<7} {n:>9,} images {result['seconds']:7.1f} s, "
                        f"{1000 * result['seconds'] / n:6.3f} ms/img, "
                        f"peak {result['rss_peak_mb']:,.0f} MB",
                        flush=True,
                    )
                shutil.rmtree(work / f"cache-{n}", ignore_errors=True)
                spent = sum(results[(step, n)]["seconds"] for step in STEPS)
                later = [m for m in sizes if m > n]
                if n == sizes[0] and later:
                    guess = spent * sum(later) / n / 60
                    print(f"  the larger sizes will take about {guess:.0f} min", flush=True)
        finally:
            component.down()
    print_table(results, sizes, load_start, download=args.download)
    print(f"whole run: {(time.perf_counter() - began) / 60:.1f} min")


def _step_mb(result: dict[str, Any]) -> float:
    return max(result["rss_peak_mb"] - result["rss_start_mb"], 0.0)


def print_table(
    results: dict[tuple[str, int], dict[str, Any]],
    sizes: list[int],
    load_start: tuple[float, ...],
    *,
    download: bool = False,
) -> None:
    small, large = sizes[0], sizes[-1]
    factor = large / small
    print()
    print(
        "ms/img: the step's wall time per image of the version; CPU: tirelib's process and the "
        "S3 server's, per image;\npeak MB: the step's process (VmHWM); step MB: what the "
        "step added to it."
    )
    what = dict(STEP_HELP)
    if download:
        what["epoch"] = "download + one pass"
    head = (
        f"{'step':<7} {'what':<25} {'images':>9} {'ms/img':>8} {'CPU tirelib':>11} "
        f"{'CPU S3':>7} {'peak MB':>8} {'step MB':>8}"
    )
    print(head)
    print("-" * len(head))
    totals = dict.fromkeys(sizes, 0.0)
    for step in STEPS:
        for n in sizes:
            r = results[(step, n)]
            totals[n] += r["seconds"]
            print(
                f"{step if n == small else '':<7} {what[step] if n == small else '':<25} "
                f"{n:>9,} {1000 * r['seconds'] / n:>8.3f} {1000 * r['cpu_seconds'] / n:>11.3f} "
                f"{1000 * r['server_cpu_seconds'] / n:>7.3f} {r['rss_peak_mb']:>8,.0f} "
                f"{_step_mb(r):>8,.0f}"
            )
    for n in sizes:
        print(f"{'total' if n == small else '':<33} {n:>9,} {1000 * totals[n] / n:>8.3f}")
    print()
    print(
        f"{large:,} against {small:,} images ({factor:g}x): per-image ratios (1.00: linear; "
        f"below: cost per version, not per image), and step memory growth ({factor:g}x or less: "
        "linear)"
    )
    head = f"{'step':<7} {'time/img':>9} {'CPU/img':>8} {'step MB':>13} {'KB/img':>7}  verdict"
    print(head)
    print("-" * len(head))
    for step in STEPS:
        a, b = results[(step, small)], results[(step, large)]
        time_ratio = (b["seconds"] / large) / (a["seconds"] / small)
        cpu_a = a["cpu_seconds"] + a["server_cpu_seconds"]
        cpu_b = b["cpu_seconds"] + b["server_cpu_seconds"]
        cpu_ratio = (cpu_b / large) / max(cpu_a / small, 1e-9)
        growth = max(_step_mb(b), 1.0) / max(_step_mb(a), 1.0)
        per_image_kb = 1024 * _step_mb(b) / large
        linear = cpu_ratio <= 1.25 and growth <= 1.25 * factor
        print(
            f"{step:<7} {time_ratio:>9.2f} {cpu_ratio:>8.2f} {growth:>12.1f}x {per_image_kb:>7.2f}"
            f"  {'linear' if linear else 'GROWS FASTER THAN THE IMAGES'}"
        )
    total_ratio = (totals[large] / large) / (totals[small] / small)
    print(f"{'total':<7} {total_ratio:>9.2f}")
    print(
        f"load average at start {' '.join(f'{v:.2f}' for v in load_start)}, at end "
        + " ".join(f"{v:.2f}" for v in os.getloadavg())
    )


if __name__ == "__main__":
    main()
