"""The image-folder input pipeline against torchvision's, side by side: `python -m bench.pipeline`.

    python -m bench.pipeline                                   # 500x375 JPEGs, 1 and 2 workers
    python -m bench.pipeline --size 500x375,2000x1500          # and photos large enough for draft mode
    python -m bench.pipeline --images 64 --batch 16 --repeats 1   # a quick look

It writes JPEGs of ImageNet's typical size (500x375, about 100 KB: a smooth random picture with
noise, quality 90) in ImageFolder's layout to a temporary folder, then reads one training epoch
of them through `train.data.train_batches` (PIL; in N threads of this process, its default, and
in N grain worker processes, with and without JPEG draft mode) and through torchvision's
`ImageFolder` + `DataLoader` with the same transforms (RandomResizedCrop, RandomHorizontalFlip,
ToTensor, Normalize) and N worker processes, into float32 batches. The pipelines take turns, the order rotating, and the table
gives medians of images per second counted after each epoch's first batch (worker start-up,
reported apart, differs: grain spawns its workers, the DataLoader forks them by default), and of
the whole epoch's seconds. Draft mode needs a crop of at least twice the output a side, so a
224 crop of a 500x375 image never uses it: `--size 2000x1500` shows what it does for photos.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from toolkit.cli import ArgumentParser, atomic_write_text, fail

PIPELINES = ("grain-threads", "grain", "grain-no-draft", "torchvision")
CLASSES = 10
JPEG_QUALITY = 90
# The picture: a random colour field 1/64 of the side, smoothly enlarged, plus uniform noise of
# this amplitude: about 100 KB at 500x375, ImageNet's average file size.
NOISE = 20


def _sizes(text: str) -> list[tuple[int, int]]:
    try:
        sizes = [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]
    except ValueError:
        sizes = []
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"got {text!r}, expected comma-separated WIDTHxHEIGHT, e.g. 500x375")
    return sizes


def _counts(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected comma-separated worker counts >= 0, e.g. 1,2")
    return values


def _pipelines(text: str) -> list[str]:
    values = [v for v in text.split(",") if v]
    if not values or set(values) - set(PIPELINES):
        raise argparse.ArgumentTypeError(f"got {text!r}, expected a comma-separated subset of {','.join(PIPELINES)}")
    return values


def build_parser() -> argparse.ArgumentParser:
    description, examples = __doc__.split("\n\n")[:2]
    p = ArgumentParser(prog="python -m bench.pipeline", description=description, epilog=f"examples:\n{examples}", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=_sizes, default=[(500, 375)], help="comma-separated image sizes WIDTHxHEIGHT (default: 500x375)")
    p.add_argument("--images", type=int, default=2048, help="training images written per size (default: %(default)s)")
    p.add_argument("--workers", type=_counts, default=[1, 2], help="comma-separated counts of worker processes (of threads for grain-threads) (default: 1,2)")
    p.add_argument("--pipelines", type=_pipelines, default=list(PIPELINES), help=f"comma-separated subset of {','.join(PIPELINES)}")
    p.add_argument("--resolution", type=int, default=224, help="the random resized crop's side (default: %(default)s)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="epochs timed per pipeline (median reported; default: %(default)s)")
    p.add_argument("--dir", type=Path, help="write the images here and keep them (default: a temporary folder, removed after)")
    p.add_argument("--out", help="write the results as JSON here")
    return p


def write_images(root: Path, size: tuple[int, int], count: int) -> float:
    """`count` training JPEGs in CLASSES class folders (and one evaluation image a class, which the
    layout needs); their mean file size in KB."""
    from PIL import Image

    rng = np.random.default_rng(0)
    width, height = size
    total = 0
    for i in range(count + CLASSES):
        split, name = ("train", f"c{i % CLASSES}") if i < count else ("val", f"c{i - count}")
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        field = rng.integers(0, 256, (max(1, height // 64), max(1, width // 64), 3), dtype=np.uint8)
        picture = np.asarray(Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC), np.int16)
        picture = np.clip(picture + rng.integers(-NOISE, NOISE + 1, picture.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(picture).save(path, quality=JPEG_QUALITY)
        total += path.stat().st_size
    return total / (count + CLASSES) / 1024


def _grain_epoch(root: str, workers: int, batch: int, resolution: int, epoch: int, draft: bool, threads: int | None = None):
    from train import data

    recipe = data.recipe(None, resolution)
    if not draft:
        import dataclasses

        recipe = dataclasses.replace(recipe, jpeg_draft=False)
    return data.train_batches(root, resolution=resolution, global_batch_size=batch, seed=0, epoch=epoch, recipe=recipe, workers=workers, threads=threads)


def _torchvision_epoch(root: str, workers: int, batch: int, resolution: int, epoch: int):
    import torch
    from torchvision import datasets, transforms

    from train import augment

    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(resolution),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(augment.IMAGENET_MEAN_RGB, augment.IMAGENET_STD_RGB),
        ]
    )
    dataset = datasets.ImageFolder(os.path.join(root, "train"), transform=transform)
    generator = torch.Generator().manual_seed(epoch)
    return iter(torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True, generator=generator))


def time_epoch(batches) -> tuple[float, float, float]:
    """(seconds to the first batch, images per second after it, seconds in all) of one epoch."""
    start = time.perf_counter()
    first = next(batches)
    first_at = time.perf_counter()
    count = 0
    for batch in batches:
        count += len(batch["image"] if isinstance(batch, dict) else batch[0])
    end = time.perf_counter()
    if hasattr(batches, "close"):
        batches.close()
    del first
    return first_at - start, count / max(end - first_at, 1e-9), end - start


def run(root: str, size: tuple[int, int], args) -> list[dict]:
    from train import folder

    start = time.perf_counter()
    images = folder.find(root)  # the layout and every image checked, once (not timed below)
    check_ms = (time.perf_counter() - start) / (len(images.train) + len(images.eval)) * 1000
    rows = []
    for workers in args.workers:
        makers = {
            "grain-threads": lambda epoch: _grain_epoch(root, 0, args.batch, args.resolution, epoch, draft=True, threads=workers),
            "grain": lambda epoch: _grain_epoch(root, workers, args.batch, args.resolution, epoch, draft=True),
            "grain-no-draft": lambda epoch: _grain_epoch(root, workers, args.batch, args.resolution, epoch, draft=False),
            "torchvision": lambda epoch: _torchvision_epoch(root, workers, args.batch, args.resolution, epoch),
        }
        names = list(args.pipelines)
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in names}
        for repeat in range(args.repeats):
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                results[name].append(time_epoch(makers[name](repeat)))
        for name in names:
            rate = statistics.median(r for _, r, _ in results[name])
            rows.append(
                {
                    "size": f"{size[0]}x{size[1]}",
                    "workers": workers,
                    "pipeline": name,
                    "images_per_s": rate,
                    "images_per_s_per_worker": rate / max(workers, 1),
                    "first_batch_s": statistics.median(f for f, _, _ in results[name]),
                    "epoch_s": statistics.median(e for _, _, e in results[name]),
                    "check_ms_per_image": check_ms,
                }
            )
        reference = next((r["images_per_s"] for r in rows[-len(names) :] if r["pipeline"] == "torchvision"), None)
        for row in rows[-len(names) :]:
            row["vs_torchvision"] = row["images_per_s"] / reference if reference else None
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| images | workers | pipeline | img/s | img/s per worker | vs torchvision | first batch s | epoch s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ratio = f"{r['vs_torchvision']:.2f}x" if r["vs_torchvision"] else ""
        lines.append(
            f"| {r['size']} | {r['workers']} | {r['pipeline']} | {r['images_per_s']:,.0f} | {r['images_per_s_per_worker']:,.0f} | {ratio} | {r['first_batch_s']:.1f} | {r['epoch_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch < 1 or args.repeats < 1 or args.resolution < 1:
        fail("--batch, --repeats and --resolution: expected at least 1")
    if args.images < args.batch:
        fail(f"--images {args.images} is fewer than one batch of {args.batch}: expected at least {args.batch}")
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        fail(f"--out {args.out}: its directory does not exist; create it or choose another path")
    print(f"machine: {os.cpu_count()} cores; {args.images} images a size, batch {args.batch}, crop {args.resolution}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as scratch:
        for size in args.size:
            root = (args.dir or Path(scratch)) / f"{size[0]}x{size[1]}"
            if not (root / "train").is_dir():
                kilobytes = write_images(root, size, args.images)
                print(f"wrote {args.images} JPEGs of {size[0]}x{size[1]} ({kilobytes:.0f} KB on average) to {root}", flush=True)
            rows += run(str(root), size, args)
            print(markdown_table(rows[-len(args.workers) * len(args.pipelines) :]), file=sys.stderr, flush=True)
    check = ", ".join(f"{r['size']} {r['check_ms_per_image']:.1f} ms" for r in rows[:: len(args.workers) * len(args.pipelines)])
    print(markdown_table(rows))
    print(f"the up-front check (each image decoded once, at 1/8 scale for a JPEG, in threads): {check} per image")
    if args.out:
        atomic_write_text(args.out, json.dumps({"cores": os.cpu_count(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
