"""`autoselect show`: pictures of which visual tokens a method keeps.

    autoselect show --model PATH [--selector PATH] --image a.png [--image b.png ...] --keep 64 \\
        --methods autoselect,norm,random --out kept.png

Each image is shown as the model's processor sees it (resized to its input size), once per method:
the kept patches outlined, the pruned ones dimmed. The selection is the one the patched model
makes at prefill (`autoselect.apply` + `autoselect.integrations.last_selection`), so what is drawn
is what the language model reads. For LLaVA-1.5-style models (a square grid of patches, one view).
"""

import argparse
import math
import os
from typing import List, Optional, Sequence

import torch

from .conversation import IMAGE_TOKEN, llava_prompt


def draw_selection(image, index: Sequence[int], grid: int, *, outline=(255, 40, 40), dim: float = 0.35):
    """A copy of `image` (PIL, square) with the patches in `index` (row-major over a grid x grid
    layout) outlined and the others darkened to `dim` of their brightness."""
    from PIL import Image, ImageDraw

    picture = image.convert("RGB")
    width, height = picture.size
    keep = torch.zeros(grid * grid, dtype=torch.bool)
    keep[torch.as_tensor(list(index), dtype=torch.long)] = True
    darkened = Image.eval(picture, lambda value: int(value * dim))
    mask = Image.new("L", picture.size, 0)
    draw_mask = ImageDraw.Draw(mask)
    cell_w, cell_h = width / grid, height / grid
    boxes = []
    for position in keep.nonzero().flatten().tolist():
        row, column = divmod(position, grid)
        box = (round(column * cell_w), round(row * cell_h), round((column + 1) * cell_w) - 1,
               round((row + 1) * cell_h) - 1)
        draw_mask.rectangle(box, fill=255)
        boxes.append(box)
    result = Image.composite(picture, darkened, mask)
    draw = ImageDraw.Draw(result)
    for box in boxes:
        draw.rectangle(box, outline=outline)
    return result


def contact_sheet(tiles: List[List], labels: Sequence[str], *, pad: int = 6):
    """Rows of equally sized PIL tiles in one picture, a label line above each column."""
    from PIL import Image, ImageDraw

    rows, columns = len(tiles), max(len(row) for row in tiles)
    tile_w, tile_h = tiles[0][0].size
    label_h = 16
    sheet = Image.new("RGB", (columns * (tile_w + pad) + pad, label_h + rows * (tile_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for column, label in enumerate(labels):
        draw.text((pad + column * (tile_w + pad), 2), label, fill="black")
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            sheet.paste(tile, (pad + c * (tile_w + pad), label_h + pad + r * (tile_h + pad)))
    return sheet


@torch.no_grad()
def kept_indices(model, processor, image, *, method: str, keep, selector=None, prompt: str = "Describe the image.",
                 seed: int = 0) -> List[int]:
    """The visual-token indices `method` keeps for `image` (one prefill of the patched model)."""
    from .integrations import apply, last_selection, revert

    text = llava_prompt(f"{getattr(processor, 'image_token', IMAGE_TOKEN)}\n{prompt}")
    batch = processor(images=[image], text=[text], return_tensors="pt").to(model.device)
    options = {"seed": seed} if method == "random" else {}
    apply(model, selector if method == "autoselect" else None, method=method, keep=keep, **options)
    try:
        model(**batch)
        selection = last_selection(model)
    finally:
        revert(model)
    return selection.index[0].tolist()


def show(model, processor, images, *, methods: Sequence[str], keep, selector=None, seed: int = 0):
    """A contact sheet: one row per image, one column per method, kept patches outlined."""
    size = processor.image_processor.size
    side = None
    for key in ("shortest_edge", "height"):
        side = side or (size.get(key) if hasattr(size, "get") else getattr(size, key, None))
    side = int(side or size)
    rows = []
    for image in images:
        resized = image.convert("RGB").resize((side, side))
        row = []
        for method in methods:
            index = kept_indices(model, processor, image, method=method, keep=keep, selector=selector, seed=seed)
            tokens = getattr(model.config, "image_seq_length", None) or (side // 14) ** 2
            row.append(draw_selection(resized, index, int(math.isqrt(tokens))))
        rows.append(row)
    return contact_sheet(rows, [f"{m} (keep {keep})" for m in methods])


def build_parser(parser: Optional[argparse.ArgumentParser] = None):
    parser = parser or argparse.ArgumentParser(prog="autoselect show", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="folder of the Hugging Face VLM (local, LLaVA-1.5 style)")
    parser.add_argument("--selector", help="folder of an AutoSelector (for method autoselect)")
    parser.add_argument("--image", action="append", required=True, help="an image file (repeatable)")
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--methods", default="autoselect,norm,random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="kept.png", help="PNG to write")
    return parser


def run(args):
    from PIL import Image

    from .modules.selector import AutoSelector
    from .hf import load_vlm

    model, processor = load_vlm(args.model)
    selector = AutoSelector.from_pretrained(args.selector) if args.selector else None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "autoselect" in methods and selector is None:
        methods.remove("autoselect")
        print("no --selector: leaving out method autoselect")
    images = [Image.open(path).convert("RGB") for path in args.image]
    sheet = show(model, processor, images, methods=methods, keep=args.keep, selector=selector, seed=args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out} ({len(images)} images x {len(methods)} methods)")
    return sheet
