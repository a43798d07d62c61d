"""Write the testbed's visual questions and captions: `python -m autoselect.testbed --out data/testbed`.

Writes images/, train.json, val.json, test.json (LLaVA conversation format), *_scenes.json and
*_captions.json (one caption record per image, "type": "caption": the selector's training data) under
--out. The same (--seed, split, image index) always gives the same image, questions and caption; the
captions change no other file. --captions-only adds the caption files to a folder written before they
existed (from its *_scenes.json, no image rendered again). --version 2 writes testbed v2 (`data_v2`: harder
scenes, relation and digit-reading questions, the image before the question); the default, 1, writes
testbed v1 (`data`), which the shipped weights were trained on."""

import argparse
import os
import sys

from . import data, data_v2

SPLIT_NAMES = ("train", "val", "test")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m autoselect.testbed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--train", type=int, default=8000, help="training images")
    parser.add_argument("--val", type=int, default=500, help="validation images")
    parser.add_argument("--test", type=int, default=500, help="test images")
    parser.add_argument("--questions-per-image", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--version", type=int, choices=(1, 2), default=1,
                        help="testbed version: 1 (data, the shipped weights') or 2 (data_v2)")
    captions = parser.add_mutually_exclusive_group()
    captions.add_argument("--no-captions", action="store_true", help="do not write *_captions.json")
    captions.add_argument("--captions-only", action="store_true",
                          help="only write *_captions.json, from the *_scenes.json already in --out "
                               "(the image counts and --seed are then those of that folder)")
    args = parser.parse_args(argv)
    generator = data if args.version == 1 else data_v2
    for split in SPLIT_NAMES:
        if getattr(args, split) < 0:
            parser.error(f"--{split} must be >= 0")
    if args.captions_only:
        found = [s for s in SPLIT_NAMES if os.path.exists(os.path.join(args.out, f"{s}_scenes.json"))]
        if not found:
            parser.error(f"--captions-only: no *_scenes.json in {args.out}")
        for split in found:
            print(f"{split}: {generator.write_captions(args.out, split)} captions")
        return 0
    for split in SPLIT_NAMES:
        count = getattr(args, split)
        per_type = generator.write_split(args.out, split, count, args.seed, args.questions_per_image,
                                         captions=not args.no_captions)
        written = "" if args.no_captions else f", {count} captions"
        print(f"{split}: {count} images, {sum(per_type.values())} questions {per_type}{written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
