"""The mean of two saved tiny VLMs' weights ("model soup"): OUT gets A's config and processor files and
each floating-point tensor of model.safetensors as (A + B) / 2. The two must share one config (same
sizes, same rotary base); meaningful only for two runs continued from one model, whose weights stay in
one basin.

    python weights/tiny-vlm-v2-wip/diagnostics/soup.py autoselect/weights/tiny-vlm-v2 \
        checkpoints/v2-rope24b checkpoints/soup-a
"""
import argparse
import json
import os
import shutil

from safetensors.torch import load_file, save_file


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("out")
    args = parser.parse_args()
    with open(os.path.join(args.a, "config.json")) as fa, open(os.path.join(args.b, "config.json")) as fb:
        if json.load(fa) != json.load(fb):
            raise SystemExit(f"{args.a} and {args.b} have different configs: their weights cannot be averaged")
    a = load_file(os.path.join(args.a, "model.safetensors"))
    b = load_file(os.path.join(args.b, "model.safetensors"))
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        raise SystemExit(f"{args.a} and {args.b} hold different tensors")
    os.makedirs(args.out, exist_ok=True)
    for name in os.listdir(args.a):
        if name.endswith(".json"):
            shutil.copy(os.path.join(args.a, name), args.out)
    mean = {k: ((a[k].float() + b[k].float()) / 2).to(a[k].dtype) if a[k].is_floating_point() else a[k] for k in a}
    save_file(mean, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
    distance = sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a if a[k].is_floating_point()) ** 0.5
    print(f"wrote {args.out}: the mean of {len(a)} tensors; |A - B| = {distance:.3f}")


if __name__ == "__main__":
    main()
