"""Query feature encoder: the box's cached DETR decoder query, projected and fused with box features.

- ``project``: LayerNorm + 2-layer MLP ``D -> dim`` (decoder queries of different detectors differ in
  width and scale).
- optional object-to-object attention (``object_attn_layers``): the projected queries of the valid
  boxes of one image attend to each other (the paper's appendix enhancement), so a box knows what
  overlaps it.
- ``film`` / ``add``: the query conditions the box features before the box encoder (per-channel
  scale and shift, zero-initialised so training starts from the unconditioned features).
- ``mask_embed``: the dynamic mask kernel; mask logit per pixel = box feature . mask_embed(query)
  (Mask2Former / the paper's "box features . projected query").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mfdetr.model.image_encoder import transformer_layers


class MLP(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class QueryEncoder(nn.Module):
    """Queries ``[B, K, D]`` -> projected ``[B, K, dim]`` (with object attention over valid boxes)."""

    def __init__(
        self,
        query_dim: int,
        dim: int,
        object_attn_layers: int = 0,
        fusion: str = "film",
        heads: int = 4,
        box_dim: int | None = None,
    ):
        super().__init__()
        box_dim = box_dim or dim
        self.fusion = fusion
        self.norm = nn.LayerNorm(query_dim)
        self.project = MLP(query_dim, dim, dim)
        self.object_attn = transformer_layers(dim, heads, object_attn_layers)
        self.out_norm = nn.LayerNorm(dim)
        n_mod = {"film": 2 * box_dim, "add": box_dim}.get(fusion, 0)
        self.modulate = nn.Linear(dim, n_mod) if n_mod else None
        if self.modulate is not None:
            nn.init.zeros_(self.modulate.weight)
            nn.init.zeros_(self.modulate.bias)
        self.dim = dim

    def encode(self, queries: Tensor, valid: Tensor) -> Tensor:
        """``[B, K, D]`` queries and ``[B, K]`` valid -> ``[B, K, dim]``."""
        q = self.project(self.norm(queries))
        if len(self.object_attn):
            pad = ~valid
            # an image with no valid box: let it attend to its (ignored) padding instead of NaN
            pad = pad & valid.any(dim=1, keepdim=True)
            for layer in self.object_attn:
                q = layer(q, src_key_padding_mask=pad)
        return self.out_norm(q)

    def fuse(self, x: Tensor, q: Tensor) -> Tensor:
        """Condition box features ``[R, box_dim, S, S]`` on their queries ``[R, dim]``."""
        if self.modulate is None:
            return x
        m = self.modulate(q).to(x.dtype)
        if self.fusion == "film":
            gamma, beta = m.chunk(2, dim=1)
            return x * (1 + gamma[:, :, None, None]) + beta[:, :, None, None]
        return x + m[:, :, None, None]


class DotMaskPredictor(nn.Module):
    """Mask logits ``[R, S, S]`` = (box features ``[R, C, S, S]``) . (mask kernel from the query [R, dim])."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.embed = MLP(dim, dim, channels)
        self.bias = nn.Parameter(torch.zeros(()))
        self.scale = 1.0 / math.sqrt(channels)

    def forward(self, x: Tensor, q: Tensor) -> Tensor:
        kernel = self.embed(q).to(x.dtype) * self.scale
        r, c, h, w = x.shape
        # [R,1,C] @ [R,C,HW] as one batched matmul (x may be channels-last: reshape copies if needed)
        out = torch.bmm(kernel.unsqueeze(1), x.reshape(r, c, h * w)).view(r, h, w)
        return out + self.bias


class QueryShapePrior(nn.Module):
    """Mask logits from the query alone: ``[R, dim]`` -> ``[R, G, G]`` -> bilinear ``[R, S, S]``.

    The last layer is zero-initialised: training starts from the feature-only masks.
    """

    def __init__(self, dim: int, grid: int):
        super().__init__()
        self.grid = grid
        self.mlp = MLP(dim, dim, grid * grid)
        nn.init.zeros_(self.mlp.fc2.weight)
        nn.init.zeros_(self.mlp.fc2.bias)

    def forward(self, q: Tensor, size: int) -> Tensor:
        g = self.mlp(q).view(-1, 1, self.grid, self.grid)
        out = torch.nn.functional.interpolate(g, size=(size, size), mode="bilinear", align_corners=False)
        return out[:, 0]
