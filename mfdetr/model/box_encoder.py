"""Box feature encoder: a few layers within each box's RoIAligned ``[R, dim, S, S]`` features.

``"conv"``: residual depthwise-separable 3x3 blocks (the receptive field grows by 2 cells per block;
a dense 3x3 conv at dim 128 and 32x32 would cost ~9x more per box, too much for a CPU budget).
``"attn"``: each layer is a conv block followed by attention from a pooled 8x8 token grid of the box
to itself, the box's query and (``box_object_attn``) the other objects of the image (their queries +
their boxes relative to this one: the paper's box-to-object attention), whose output is upsampled and
added back: global context within the box (which object owns which part) at 64 query tokens instead
of S*S.
``"none"``: identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mfdetr.model.image_encoder import DWSepBlock, sine_pos_embed_2d


class PooledBoxAttention(nn.Module):
    """Attention from a ``grid x grid`` pooling of the box to itself, the box's projected query and
    (optionally) every other object of its image, added back to the box features.

    Object tokens (the paper's box-to-object attention) are the other boxes' projected queries plus
    an embedding of their box relative to this one (``(x1, y1, x2, y2)`` in this box's unit frame):
    what overlaps the box and where, so its pixels can be given to the right instance.
    """

    def __init__(self, dim: int, grid: int = 8, heads: int = 4, query_dim: int = 0, objects: bool = False):
        super().__init__()
        self.grid = grid
        self.q_proj = nn.Linear(query_dim, dim) if query_dim else None
        self.rel = (
            nn.Sequential(nn.Linear(4, dim), nn.GELU(), nn.Linear(dim, dim))
            if objects and query_dim
            else None
        )
        self.norm = nn.LayerNorm(dim)
        self.kv_norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(
        self, x: Tensor, q: Tensor | None, objects: tuple[Tensor, Tensor, Tensor] | None = None
    ) -> Tensor:
        """x [R,C,S,S]; q [R,Dq]; objects: (queries [R,K,Dq], relative boxes [R,K,4], ignore [R,K])."""
        r, c, h, w = x.shape
        g = min(self.grid, h, w)
        t = F.adaptive_avg_pool2d(x, g).flatten(2).transpose(1, 2)
        t = self.norm(t + sine_pos_embed_2d(g, g, c, x.device, x.dtype))
        kv = [t]
        pad = None
        if q is not None and self.q_proj is not None:
            kv.append(self.kv_norm(self.q_proj(q).unsqueeze(1).to(t.dtype)))
            if objects is not None and self.rel is not None:
                oq, rel, ignore = objects
                kv.append(self.kv_norm((self.q_proj(oq) + self.rel(rel)).to(t.dtype)))
                pad = torch.cat([torch.zeros(r, g * g + 1, dtype=torch.bool, device=x.device), ignore], dim=1)
        kv_t = torch.cat(kv, dim=1)
        y, _ = self.attn(t, kv_t, kv_t, key_padding_mask=pad, need_weights=False)
        y = self.out(y).transpose(1, 2).reshape(r, c, g, g)
        return x + F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)


class BoxEncoder(nn.Module):
    """``[R, dim, S, S]`` (+ per-box query ``[R, query_dim]``) -> ``[R, dim, S, S]``.

    With ``scale=2`` the blocks run on the 2x2 average (``S/2``) and their residual update is
    upsampled (bilinear) and added to the full-resolution input. Tensors run channels-last (the
    depthwise convs are ~2.5x faster so on CPU).
    """

    def __init__(
        self,
        dim: int,
        mode: str = "conv",
        layers: int = 2,
        scale: int = 1,
        query_dim: int = 0,
        objects: bool = False,
    ):
        super().__init__()
        self.mode = mode
        self.scale = scale
        self.objects = objects and mode == "attn"
        n = layers if mode != "none" else 0
        self.convs = nn.ModuleList(DWSepBlock(dim) for _ in range(n))
        self.attns = nn.ModuleList(
            PooledBoxAttention(dim, query_dim=query_dim, objects=objects)
            for _ in range(n if mode == "attn" else 0)
        )

    def forward(
        self, x: Tensor, q: Tensor | None = None, objects: tuple[Tensor, Tensor, Tensor] | None = None
    ) -> Tensor:
        if not len(self.convs):
            return x
        x = x.contiguous(memory_format=torch.channels_last)
        y = F.avg_pool2d(x, self.scale) if self.scale > 1 else x
        for i, conv in enumerate(self.convs):
            y = conv(y)
            if self.mode == "attn":
                y = self.attns[i](y, q, objects)
        if self.scale > 1:
            y0 = F.avg_pool2d(x, self.scale)
            return x + F.interpolate(y - y0, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return y
