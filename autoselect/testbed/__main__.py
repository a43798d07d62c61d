"""Write the testbed's visual questions: `python -m autoselect.testbed --out data/testbed`.

Writes images/, train.json, val.json, test.json (LLaVA conversation format) and *_scenes.json under
--out. The same (--seed, split, image index) always gives the same image and questions."""

import argparse
import sys

from .data import write_split


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m autoselect.testbed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--train", type=int, default=8000, help="training images")
    parser.add_argument("--val", type=int, default=500, help="validation images")
    parser.add_argument("--test", type=int, default=500, help="test images")
    parser.add_argument("--questions-per-image", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for split in ("train", "val", "test"):
        count = getattr(args, split)
        if count < 0:
            parser.error(f"--{split} must be >= 0")
        per_type = write_split(args.out, split, count, args.seed, args.questions_per_image)
        print(f"{split}: {count} images, {sum(per_type.values())} questions {per_type}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
