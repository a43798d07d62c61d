"""Token selection and M-RoPE positions for the vLLM plugin, on plain tensors (no vLLM import here).

`Pruner` keeps K_i rows of each image's embeddings with the configured method, exactly as
`autoselect.apply` does on the Hugging Face path for one image per call: the selector scores the
tokens at its placement ("projector_input": the vision features the projector receives, LLaVA;
"projector_output": the projector's / merger's output), the baselines read the projector's output,
and the kept rows stay in spatial order. The random baseline draws each image with a generator seeded
with `seed` (vLLM batches images across requests as its scheduler likes, so a draw per image is the
only one that does not depend on the batch).

Qwen's M-RoPE keeps the kept tokens' unpruned positions (`mrope_layout`, `place_kept_tokens`): the
prompt's positions are laid out at request time as for the unpruned prompt, with each image's K
placeholders at the image's first position; once the vision encoder has chosen the tokens, their
(t, h, w) offsets inside the image's grid travel with the embeddings (three extra channels) and
`place_kept_tokens` adds them. Text after an image continues where it would without pruning, so
decoding needs no correction.
"""

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ..baselines import make_method
from .config import PruneConfig, WHERE

POSITION_CHANNELS = 3  # (t, h, w) offsets appended to each kept token's embedding (Qwen)


class Pruner:
    """The configured method, ready to select: `budget(N)`, `select(outputs, inputs) -> index list`."""

    def __init__(self, config: PruneConfig, device=None):
        self.config = config
        self.selector = None
        self.placement = "projector_output"
        if config.method == "autoselect":
            from ..modules.selector import AutoSelector

            self.selector = AutoSelector.from_pretrained(config.selector).eval()
            if device is not None:
                self.selector.to(device)
            self.placement = self.selector.config.get("placement") or "projector_output"
            self.method = None
        else:
            options = {"seed": config.seed} if config.method == "random" else {}
            self.method = make_method(config.method, None, **options)

    @property
    def dim(self) -> Optional[int]:
        return None if self.selector is None else int(self.selector.config["dim"])

    def check_width(self, placement_widths: dict, family: str) -> None:
        """ValueError unless the selector's placement is offered with its width (placement -> width)."""
        if self.selector is None:
            return
        offered = ", ".join(f"{p} (dim {w})" for p, w in placement_widths.items())
        if self.placement not in placement_widths:
            raise ValueError(f"{WHERE}: the selector {self.config.selector!r} was trained at placement "
                             f"{self.placement!r}, which a {family} model does not offer; it offers {offered}")
        if self.dim != placement_widths[self.placement]:
            raise ValueError(f"{WHERE}: the selector {self.config.selector!r} reads tokens of width {self.dim} at "
                             f"{self.placement!r}, but this {family} model's tokens there have width "
                             f"{placement_widths[self.placement]}; use a selector trained on this model")

    def budget(self, num_tokens: int) -> int:
        return self.config.budget(num_tokens)

    @torch.no_grad()
    def select(self, outputs: Sequence[Tensor], inputs: Optional[Sequence[Tensor]] = None) -> List[Tensor]:
        """Kept indices (ascending, int64) per image. outputs: the projector's output per image (N_i, D);
        inputs: the projector's input per image (N_i, D_in), needed for a projector_input selector."""
        outputs = list(outputs)
        ks = [self.budget(int(x.shape[0])) for x in outputs]
        if self.selector is not None:
            source = outputs
            if self.placement == "projector_input":
                if inputs is None:
                    raise RuntimeError(f"{WHERE}: a projector_input selector needs the projector's input")
                source = list(inputs)
            device = source[0].device if source else None
            if device is not None and next(self.selector.parameters()).device != device:
                self.selector.to(device)  # the model's device (a GPU worker), as autoselect.apply does
            _, index = self.selector.select(source, ks)
            return [i.to(torch.long) for i in index]
        index = []
        for x, k in zip(outputs, ks):  # one image at a time: the same draw whatever the batch
            _, picked = self.method.select([x], [k])
            index.append(picked[0].to(torch.long))
        return index


def mrope_layout(input_len: int, images: Sequence[Tuple[int, int, int, int, int, float]]) -> Tuple[np.ndarray, int]:
    """M-RoPE positions (3, input_len) of a prompt whose images were pruned, and the rope delta.

    images: per item in prompt order (offset of its first placeholder, grid t, h, w after the merge,
    K placeholders, the temporal factor: 1 for images, seconds per grid step x tokens per second for
    videos). Text positions are those of the unpruned prompt (each image spans its whole grid:
    text after it continues at the grid's largest position + 1); each image's K placeholders hold the
    image's first position in all three rows until `place_kept_tokens` adds the kept tokens' offsets.
    An image with K = t*h*w gets its grid positions at once."""
    rows: List[np.ndarray] = []
    start, next_pos = 0, 0
    for offset, t, h, w, k, t_factor in images:
        text = offset - start
        rows.append(np.broadcast_to(np.arange(text), (3, text)) + next_pos)
        base = next_pos + text
        grid = np.indices((t, h, w)).reshape(3, -1)
        if t_factor != 1.0:
            grid[0] = (grid[0] * t_factor).astype(np.int64)
        rows.append(grid + base if k == t * h * w else np.full((3, k), base, dtype=np.int64))
        next_pos = base + int(grid.max()) + 1
        start = offset + k
    if start < input_len:
        rows.append(np.broadcast_to(np.arange(input_len - start), (3, input_len - start)) + next_pos)
    positions = np.concatenate(rows, axis=1).astype(np.int64) if rows else np.zeros((3, 0), np.int64)
    delta = int(next_pos - input_len) if start >= input_len and images else \
        int((positions.max() + 1 if positions.size else 0) - input_len)
    return positions, delta


def grid_offsets(index: Tensor, t: int, h: int, w: int) -> Tensor:
    """(t, h, w) offsets (K, 3) of the kept tokens `index` (row-major over the merged grid)."""
    index = index.to(torch.long)
    return torch.stack([index // (h * w), (index // w) % h, index % w], dim=1)


def place_kept_tokens(input_ids: Tensor, image_token_id: int, offsets: Sequence[Tensor], positions: Tensor,
                      num_computed_tokens: int) -> Tensor:
    """Positions with the kept tokens of this step in place: the rows of `offsets` (each (R_i, 3), in
    prompt order) belong to the first image placeholders at or after `num_computed_tokens`; each gets
    its image's first position (one after the token before the image's run of placeholders) plus its
    offsets. Idempotent: the image's first position is read from the token before the run."""
    positions = positions.clone()
    offsets = [o for o in offsets if o.shape[0] > 0]
    if not offsets:
        return positions
    rows = torch.cat(offsets).to(torch.long).to(positions.device)
    ids = input_ids.to(positions.device)
    is_image = ids == image_token_id
    slots = torch.nonzero(is_image[num_computed_tokens:]).squeeze(1)[: rows.shape[0]] + num_computed_tokens
    if slots.numel() != rows.shape[0]:
        raise RuntimeError(f"{WHERE}: {rows.shape[0]} kept image tokens for {slots.numel()} placeholders")
    previous = torch.cat([torch.zeros(1, dtype=torch.bool, device=ids.device), is_image[:-1]])
    run_start = torch.cumsum((is_image & ~previous).to(torch.long), 0)  # run number of each placeholder
    starts = torch.nonzero(is_image & ~previous).squeeze(1)
    first = starts[run_start[slots] - 1]
    base = torch.where(first > 0, positions[0, (first - 1).clamp(min=0)] + 1, torch.zeros_like(first))
    positions[:, slots] = (base.unsqueeze(1) + rows).t().to(positions.dtype)
    return positions
