"""Write the WaterBirds-layout set of real photographs (aim.data.photos: LFW faces and coins
pasted on grey ground textures or colour scenes, all from the photographs that scikit-image
ships in its wheel; nothing is downloaded), for `aim train --data`/`study_spurious.py --data`.

    PYTHONPATH=. python benchmarks/make_photo_waterbirds.py --out /tmp/photo_wb [--spurious-correlation 1.0] [--seed 0]
    PYTHONPATH=. python benchmarks/study_spurious.py --data /tmp/photo_wb --segmentations /tmp/photo_wb/segmentations ...
"""
import argparse
import collections
import os
import shutil

from aim.data import photos


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write (replaced if it holds a metadata.csv)")
    parser.add_argument("--spurious-correlation", type=float, default=1.0,
                        help="fraction of each training class on its own place (default 1.0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    for split, count in photos.DEFAULT_COUNTS.items():
        parser.add_argument(f"--{split}", type=int, default=count, help=f"{split} images (default {count})")
    args = parser.parse_args(argv)
    if os.path.isfile(os.path.join(args.out, "metadata.csv")):
        shutil.rmtree(args.out)
    elif os.path.isdir(args.out) and os.listdir(args.out):
        parser.error(f"{args.out} is not empty and holds no metadata.csv: not replacing it")
    rows = photos.write_photo_waterbirds(args.out, args.spurious_correlation, args.seed, args.image_size,
                                         {split: getattr(args, split) for split in photos.DEFAULT_COUNTS})
    groups = collections.Counter((row["split"], row["y"], row["place"]) for row in rows)
    print(f"wrote {len(rows)} images of {args.image_size}x{args.image_size} to {args.out}")
    for index, split in enumerate(("train", "val", "test")):
        cells = ", ".join(f"{photos.CLASS_NAMES[y]}/{photos.PLACE_NAMES[p]} {groups[(index, y, p)]}"
                          for y in (0, 1) for p in (0, 1))
        print(f"  {split}: {cells}")


if __name__ == "__main__":
    main()
