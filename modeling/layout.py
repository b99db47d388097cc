"""The per-batch visual layout: which key positions are visual tokens, which image grid (image or
tile) each belongs to and its (row, col) on that grid. Built once per forward from `input_ids`;
families decide the grids, this module only does the bookkeeping. An image token that is no grid
cell (LLaVA-NeXT's newline after each row of its high-resolution grid) is not visual: it is gated
and attended like text. A video is one grid per temporal slice; `media_idx` and `slice_idx` say which
video (or image) a grid belongs to and its slice, for the spatio-temporal window."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class VisualLayout:
    """Layout of the whole key sequence (cache + this forward); the last `num_queries` are queries.

    All tensors are (B, K): `visual_mask` bool, `grid_idx` / `row` / `col` long (-1 on text),
    `key_valid` bool (False on padding), `media_idx` (the image or video of the grid) and `slice_idx` (its
    temporal slice in a video, 0 in an image) long, -1 on text. `grid_idx` and `media_idx` are unique over the
    batch.
    """

    visual_mask: torch.Tensor
    grid_idx: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    key_valid: torch.Tensor
    num_queries: int
    media_idx: torch.Tensor
    slice_idx: torch.Tensor

    @property
    def num_keys(self) -> int:
        return self.visual_mask.shape[1]

    @property
    def query_visual_mask(self) -> torch.Tensor:
        """(B, Q) bool: this forward's rows that are image tokens."""
        return self.visual_mask[:, self.num_keys - self.num_queries:]

    def query_positions(self) -> torch.Tensor:
        """(Q,) absolute key index of each query row."""
        return torch.arange(self.num_keys - self.num_queries, self.num_keys, device=self.visual_mask.device)

    def has_text_before(self) -> torch.Tensor:
        """(B, Q) bool: a valid non-visual key exists strictly before each query row."""
        text = (self.key_valid & ~self.visual_mask).long()
        before = text.cumsum(dim=1) - text  # exclusive prefix count
        return before[:, self.num_keys - self.num_queries:] > 0

    def span_rule(self, temporal_window: int = 1):
        """The predicate (b, query position, key index) -> bool of docs/design.md rule 1's span: query and key on
        the same grid or, with a temporal window t, on slices of the same video at most t//2 apart; only meaningful
        where both are visual. Indices may be tensors that broadcast (`same_span`) or scalars (flex's mask_mod)."""
        radius = temporal_window // 2
        if radius == 0:
            return lambda b, q, k: self.grid_idx[b, q] == self.grid_idx[b, k]
        return lambda b, q, k: ((self.media_idx[b, q] == self.media_idx[b, k])
                                & ((self.slice_idx[b, q] - self.slice_idx[b, k]).abs() <= radius))

    def same_span(self, temporal_window: int = 1) -> torch.Tensor:
        """(B, Q, K) bool: `span_rule` for every query row and key."""
        B, K = self.visual_mask.shape
        device = self.visual_mask.device
        return self.span_rule(temporal_window)(torch.arange(B, device=device)[:, None, None],
                                               self.query_positions()[None, :, None],
                                               torch.arange(K, device=device)[None, None, :])

    def keys(self, length: int) -> VisualLayout:
        """The layout truncated to its first `length` keys, with no query rows (a cropped cache)."""
        cut = lambda t: t[:, :length]
        return VisualLayout(cut(self.visual_mask), cut(self.grid_idx), cut(self.row), cut(self.col),
                            cut(self.key_valid), 0, cut(self.media_idx), cut(self.slice_idx))

    def extend(self, new: VisualLayout) -> VisualLayout:
        """Append this forward's positions (`new`) to a cached prefix; queries are `new`'s."""
        if self.visual_mask.shape[0] != new.visual_mask.shape[0]:
            raise ValueError(f"cached layout has batch size {self.visual_mask.shape[0]}, "
                             f"this forward has {new.visual_mask.shape[0]}")
        cat = lambda a, b: torch.cat([a, b], dim=1)
        return VisualLayout(cat(self.visual_mask, new.visual_mask), cat(self.grid_idx, _after(self.grid_idx, new.grid_idx)),
                            cat(self.row, new.row), cat(self.col, new.col), cat(self.key_valid, new.key_valid),
                            new.num_queries, cat(self.media_idx, _after(self.media_idx, new.media_idx)),
                            cat(self.slice_idx, new.slice_idx))


def _after(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """`second`'s indices (-1: none) numbered after `first`'s."""
    offset = int(first.max().item()) + 1 if first.numel() else 0
    return torch.where(second >= 0, second + offset, second)


def merge_layouts(first: VisualLayout, second: VisualLayout) -> VisualLayout:
    """One layout of the same tokens whose visual positions were laid out apart (e.g. images and videos, from their
    own token ids); `second`'s grids and media are numbered after `first`'s."""
    vis = second.visual_mask
    pick = lambda a, b: torch.where(vis, b, a)
    return VisualLayout(first.visual_mask | vis, pick(first.grid_idx, _after(first.grid_idx, second.grid_idx)),
                        pick(first.row, second.row), pick(first.col, second.col), first.key_valid, first.num_queries,
                        pick(first.media_idx, _after(first.media_idx, second.media_idx)),
                        pick(first.slice_idx, second.slice_idx))


def build_layout(
    input_ids: torch.Tensor,
    image_token_id: int,
    grids: Sequence[tuple[int, int] | tuple[int, int, bool]],
    attention_mask: torch.Tensor | None = None,
    slices: Sequence[int] | None = None,
) -> VisualLayout:
    """Assign image tokens to grids in reading order (batch-major), as the model scatters features.

    Args:
        input_ids: (B, T) long.
        image_token_id: the placeholder id of one visual token.
        grids: (rows, cols) or (rows, cols, newline) of every image grid in the batch, in order; each
            grid owns rows*cols consecutive image tokens (rows*(cols+1) with newline: each row is
            followed by one image token that is no grid cell and counts as text), all in one sample.
        attention_mask: optional 2D padding mask (1 = real token), (B, T) or (B, cache + T).
        slices: the temporal slice of each grid in its video (0 starts a new video or image); None: every grid
            is its own image.

    Raises:
        ValueError: the image-token counts do not match the grids; names the samples.
    """
    B, T = input_ids.shape
    device = input_ids.device
    visual_mask = input_ids == image_token_id
    # while decoding, the 2D mask covers cache + new tokens: this forward's tokens are its last T columns
    key_valid = torch.ones_like(visual_mask) if attention_mask is None else attention_mask[:, -T:].to(device).bool()
    grid_idx = torch.full((B, T), -1, dtype=torch.long, device=device)
    row = torch.full_like(grid_idx, -1)
    col = torch.full_like(grid_idx, -1)

    grids = [(int(g[0]), int(g[1]), bool(g[2]) if len(g) > 2 else False) for g in grids]
    widths = torch.tensor([c + int(nl) for _, c, nl in grids], dtype=torch.long)  # image tokens per grid row
    sizes = torch.tensor([r * (c + int(nl)) for r, c, nl in grids], dtype=torch.long)
    per_sample = visual_mask.sum(dim=1).tolist()
    total = int(sum(per_sample))
    if total != int(sizes.sum()):
        raise ValueError(
            f"image tokens do not match image features: the batch has {total} image tokens "
            f"(token id {image_token_id}; per sample {per_sample}) but its {len(grids)} image(s) give "
            f"{int(sizes.sum())} features (per image {sizes.tolist()})")
    if total == 0:
        return VisualLayout(visual_mask, grid_idx, row, col, key_valid, T, grid_idx.clone(), grid_idx.clone())

    flat = visual_mask.reshape(-1).nonzero().squeeze(1)  # (N,) positions in batch-major order
    token_sample = flat // T
    starts = torch.cumsum(sizes, 0) - sizes
    token_grid = torch.repeat_interleave(torch.arange(len(grids)), sizes).to(device)
    offset = torch.arange(total, device=device) - starts.to(device)[token_grid]
    width = widths.to(device)[token_grid]
    cols = torch.tensor([c for _, c, _ in grids], dtype=torch.long, device=device)[token_grid]

    # a grid must not straddle two samples
    nonempty = (sizes > 0).nonzero().squeeze(1)
    first = token_sample[starts[nonempty].to(device)]
    last = token_sample[(starts + sizes - 1)[nonempty].to(device)]
    if bool((first != last).any()):
        bad = int(nonempty[(first != last).nonzero()[0, 0]])
        counts = ", ".join(f"sample {b}: {n}" for b, n in enumerate(per_sample))
        raise ValueError(
            f"image tokens do not match image features: image {bad} ({grids[bad][0]}x{grids[bad][1]} = "
            f"{int(sizes[bad])} tokens) would span samples {int(token_sample[starts[bad]])} and "
            f"{int(token_sample[starts[bad] + sizes[bad] - 1])}; "
            f"image tokens per sample: {counts}")

    cell = offset % width < cols  # False on the newline that closes a row of a newline grid
    visual_mask.view(-1)[flat[~cell]] = False
    flat, token_grid, offset, width = flat[cell], token_grid[cell], offset[cell], width[cell]
    grid_idx.view(-1)[flat] = token_grid
    row.view(-1)[flat] = offset // width
    col.view(-1)[flat] = offset % width
    grid_slice = torch.zeros(len(grids), dtype=torch.long) if slices is None else torch.tensor(list(slices), dtype=torch.long)
    if grid_slice.shape != (len(grids),) or bool((grid_slice < 0).any()) or (len(grids) and int(grid_slice[0]) != 0):
        raise ValueError(f"slices must give each of the {len(grids)} grids its temporal slice (0 first), got "
                         f"{grid_slice.tolist()[:8]}")
    grid_media = torch.cumsum((grid_slice == 0).long(), 0) - 1
    media_idx, slice_idx = torch.full_like(grid_idx, -1), torch.full_like(grid_idx, -1)
    media_idx.view(-1)[flat] = grid_media.to(device)[token_grid]
    slice_idx.view(-1)[flat] = grid_slice.to(device)[token_grid]
    return VisualLayout(visual_mask, grid_idx, row, col, key_valid, T, media_idx, slice_idx)
