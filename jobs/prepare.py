"""Make a dataset folder (``DIR/dataset.json`` + WebDataset shards) for the other jobs.

    python jobs/prepare.py digits --out data/digits                # bundled corpus, no download
    python jobs/prepare.py imagefolder SRC --out DIR --split labeled
    python jobs/prepare.py register --labeled 'a/{000..009}.tar' --unlabeled 'u/*.tar' \\
        --test t.tar --out DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs._common import disk_full, disk_full_line  # noqa: E402
from pipeline.dataset import (  # noqa: E402
    FILES_PER_WORKER,
    SHARDS_PER_WORKER,
    SPLITS,
    DatasetError,
    default_workers,
    prepare_digits,
    prepare_imagefolder,
    register_shards,
)
from pipeline.fs import StorageError, check_location, location  # noqa: E402
from pipeline.shards import ShardError  # noqa: E402


def _positive(text: str) -> int:
    """argparse type: an integer >= 1 (a usage line names the option otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seed(text: str) -> int:
    """argparse type: a seed numpy and scikit-learn take (0 .. 2**32 - 1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be in 0..{2**32 - 1}, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("digits", help="scikit-learn's bundled handwritten digits as 32x32 RGB PNGs")
    d.add_argument("--out", required=True, help="dataset folder to write (local or s3://)")
    d.add_argument("--labeled-fraction", type=float, default=0.1,
                   help="share of all 1,797 images that keep their label (default 0.1)")
    d.add_argument("--test-fraction", type=float, default=0.3,
                   help="share of all images held out for testing (default 0.3)")
    d.add_argument("--seed", type=_seed, default=0,
                   help="seed of the stratified split (default 0)")
    d.add_argument("--shard-size", type=_positive, default=100,
                   help="samples per shard (default 100)")

    f = sub.add_parser("imagefolder", help="a class-per-subfolder tree (flat for unlabeled)")
    f.add_argument("src", help="folder of images (local, or an s3:// prefix)")
    f.add_argument("--out", required=True,
                   help="dataset folder, created or extended (local or s3://)")
    f.add_argument("--split", choices=SPLITS, default="labeled",
                   help="which split to write (default labeled)")
    f.add_argument("--shard-size", type=_positive, default=1000,
                   help="samples per shard (default 1000)")
    f.add_argument("--workers", type=_positive, default=None,
                   help=f"processes that decode and check the images (default: one per CPU, "
                        f"{default_workers()} here; at most one per {FILES_PER_WORKER} files)")
    f.add_argument("--max-short-side", type=_positive, default=None, metavar="PX",
                   help="shrink images whose shorter side is longer than PX to PX (aspect "
                        "kept) and store them as JPEG (default: every file keeps its bytes). "
                        "Training at 224 px uses up to 915 px (its smallest random crops, 8%% "
                        "of the area, keep full detail), at 600 px up to 2450; evaluation uses "
                        "256 at 224 and 632 at 600. Below that, the smallest crops are upscaled")
    f.add_argument("--jpeg-quality", type=int, default=None, metavar="Q",
                   help="JPEG quality of the shrunk images, 1..95 (default 90)")
    f.add_argument("--seed", type=_seed, default=0,
                   help="seed of the random order the samples are written in (default 0); "
                        "shards mix the classes, as the training streams need")

    r = sub.add_parser("register", help="describe existing shards without copying them")
    for split in SPLITS:
        r.add_argument(f"--{split}", required=True,
                       help=f"{split} shards: paths, a glob or a brace pattern (local or s3://)")
    r.add_argument("--classes", help="comma-separated class names, in label order (default: 0..max label)")
    r.add_argument("--out", required=True, help="folder for dataset.json (local or s3://)")
    r.add_argument("--workers", type=_positive, default=None,
                   help=f"processes that read the shards to count them (default: one per CPU, "
                        f"{default_workers()} here; at most one per {SHARDS_PER_WORKER} shards)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.out.strip():  # "" would be the working directory
        print("prepare: error: --out is empty; give the dataset folder", file=sys.stderr)
        return 2
    try:
        check_location(location(args.out))
        if args.command == "imagefolder":
            check_location(location(args.src))
        if args.command == "digits":
            info = prepare_digits(args.out, labeled_fraction=args.labeled_fraction,
                                  test_fraction=args.test_fraction, seed=args.seed,
                                  shard_size=args.shard_size)
        elif args.command == "imagefolder":
            info = prepare_imagefolder(args.src, args.out, split=args.split,
                                       shard_size=args.shard_size, workers=args.workers,
                                       max_short_side=args.max_short_side,
                                       jpeg_quality=args.jpeg_quality, seed=args.seed)
        else:
            classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
            info = register_shards(args.out, labeled=args.labeled, unlabeled=args.unlabeled,
                                   test=args.test, classes=classes, workers=args.workers)
    except (DatasetError, ShardError, StorageError) as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if not disk_full(e):
            raise
        print(disk_full_line("prepare", e, "--out", "the shards it finished are kept, and "
                             "dataset.json as it was"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prepare: interrupted; run the same command again to continue after the shards "
              "it finished", file=sys.stderr)
        return 130
    counts = ", ".join(f"{k} {v}" for k, v in info.counts().items())
    print(f"prepare: wrote {info.path.resolve() / 'dataset.json'} ({info.num_classes} classes; "
          f"{counts})")  # absolute: the same path whether the folder was new or extended
    return 0


if __name__ == "__main__":
    sys.exit(main())
