"""Pixel refinement: mask logits on a finer grid, corrected by image edges.

The box features come from stride-4 (or coarser) maps, so the coarse logits place a boundary only to
within a few pixels. For each cell of an ``M x M`` grid over the box (``MaskNetConfig.pixel_refine``)
the refiner reads

- the coarse logit there (bilinear),
- the box features there, projected to a few channels (bilinear),
- the RGB of a 3x3 patch of network-input pixels centred on the cell (bilinear on the pixel level,
  one pixel apart whatever the box size: the local edge, at the image's own resolution),

and an MLP adds a correction to the coarse logit (zero at initialisation: training starts from the
coarse masks). Points are independent, so as in PointRend only some are refined: in training the
``refine_points`` most uncertain of the loss's candidates, at inference the ``refine_infer_points``
least certain cells of the upsampled coarse logits (the boundary band); elsewhere the upsampled
coarse logit stands.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mfdetr.detectors.base import LevelSpec
from mfdetr.model.losses import point_sample

PATCH = 3  # pixels per side of the RGB patch around each cell
CENTRE = [c * PATCH * PATCH + PATCH * PATCH // 2 for c in range(3)]  # the centre pixel's channels
RGB_MEAN, RGB_STD = 114.0, 58.0  # 0..255 -> about unit scale


class PixelRefiner(nn.Module):
    """Refined mask logits at points of the box, from the coarse logits, box features and pixels.

    Shared arguments: ``logits`` [R,S,S] coarse, ``feats`` [R,F,S,S] from :meth:`project`, ``pixels``
    [B,3,H,W] the batch's pixel level (stride ``level.stride``, 0..255), ``rois`` [R,5] (batch index,
    x1, y1, x2, y2 in network-input pixels); points are (x, y) in [0,1]^2 of the box (as the losses).
    """

    def __init__(
        self,
        level: LevelSpec,
        feat_dim: int,
        size: int = 64,
        width: int = 32,
        feat_proj: int = 16,
        colour: bool = True,
    ):
        super().__init__()
        self.stride = int(level.stride)
        self.size = int(size)
        self.colour = bool(colour)
        self.proj = nn.Conv2d(feat_dim, feat_proj, 1)
        n_in = 1 + feat_proj + 3 * PATCH * PATCH + (6 if colour else 0)
        self.mlp = nn.Sequential(
            nn.Linear(n_in, width),
            nn.ReLU(inplace=True),
            nn.Linear(width, width),
            nn.ReLU(inplace=True),
            nn.Linear(width, 1),
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def project(self, feats: Tensor) -> Tensor:
        """The box features [R,C,S,S] -> the few channels the MLP reads [R,F,S,S]."""
        return self.proj(feats)

    def point_logits(
        self, logits: Tensor, feats: Tensor, pixels: Tensor, rois: Tensor, coords: Tensor
    ) -> Tensor:
        """Refined logits [R,P] at ``coords`` [R,P,2]: the coarse logit there plus the MLP's correction."""
        coarse = point_sample(logits, coords)  # border padding: as F.interpolate up to the box's edges
        grid = (2.0 * coords - 1.0).unsqueeze(1).to(feats.dtype)  # [R,1,P,2]
        f = F.grid_sample(feats, grid, padding_mode="border", align_corners=False)[:, :, 0].transpose(1, 2)
        rgb = self.patches(pixels, rois, coords).to(f.dtype)  # [R,P,3*PATCH^2]
        parts = [coarse.unsqueeze(-1).to(f.dtype), f, rgb]
        if self.colour:  # the point's colour against the object's and the background's
            centre = rgb[..., CENTRE]  # [R,P,3]
            obj, bg = self.colours(logits, pixels, rois).to(f.dtype).unbind(1)  # [R,3] each
            parts += [centre - obj[:, None], centre - bg[:, None]]
        delta = self.mlp(torch.cat(parts, dim=-1)).squeeze(-1)
        return coarse + delta.to(coarse.dtype)

    def dense(self, logits: Tensor, feats: Tensor, pixels: Tensor, rois: Tensor, n_points: int) -> Tensor:
        """``[R,M,M]`` logits: the coarse ones upsampled, refined at the ``n_points`` cells where they are
        least certain (PointRend's inference: the boundary band)."""
        m, r = self.size, logits.shape[0]
        up = F.interpolate(logits.unsqueeze(1), size=(m, m), mode="bilinear", align_corners=False)
        flat = up.flatten(1)  # [R, M*M]
        n = min(int(n_points), m * m)
        if r == 0 or n <= 0:
            return up.squeeze(1)
        idx = (-flat.abs()).topk(n, dim=1).indices  # [R,n]
        coords = torch.stack([(idx % m).float(), (idx // m).float()], dim=-1).add_(0.5).div_(m)
        vals = self.point_logits(logits, feats, pixels, rois, coords)
        return flat.scatter(1, idx, vals.to(flat.dtype)).view(r, m, m)

    @torch.no_grad()
    def colours(self, logits: Tensor, pixels: Tensor, rois: Tensor) -> Tensor:
        """``[R,2,3]``: the mean normalised RGB of the box's object and background, weighted by the
        coarse mask probability (and its complement) at the coarse cells' centres."""
        r, s_ = logits.shape[0], logits.shape[-1]
        t = (torch.arange(s_, device=logits.device, dtype=torch.float32) + 0.5) / s_
        grid = torch.stack(torch.meshgrid(t, t, indexing="xy"), dim=-1).reshape(1, -1, 2).expand(r, -1, -1)
        rgb = self.patches(pixels, rois, grid, patch=1)  # [R,S*S,3]
        p = torch.sigmoid(logits.float()).flatten(1).unsqueeze(-1)  # [R,S*S,1]
        obj = (p * rgb).sum(1) / p.sum(1).clamp(min=1e-3)
        bg = ((1 - p) * rgb).sum(1) / (1 - p).sum(1).clamp(min=1e-3)
        return torch.stack([obj, bg], dim=1)

    @torch.no_grad()
    def patches(self, pixels: Tensor, rois: Tensor, coords: Tensor, patch: int = PATCH) -> Tensor:
        """``[R,P,3*patch*patch]``: normalised RGB of the pixel patch (one input pixel apart) around
        each point."""
        r, p = coords.shape[:2]
        if r == 0:
            return pixels.new_zeros((0, p, 3 * patch * patch), dtype=torch.float32)
        rois = rois.float()
        x1, y1, x2, y2 = (rois[:, i : i + 1] for i in range(1, 5))
        cx = x1 + coords[..., 0].float() * (x2 - x1)  # [R,P] in input pixels
        cy = y1 + coords[..., 1].float() * (y2 - y1)
        off = torch.arange(patch, device=rois.device, dtype=torch.float32) - (patch - 1) / 2
        hp, wp = pixels.shape[-2:]
        # input pixel x sits at x / stride on the level; grid_sample(align_corners=False) wants
        # 2 * (x / stride) / W - 1
        gx = 2.0 * (cx[:, :, None, None] + off[None, None, None, :]) / (self.stride * wp) - 1.0
        gy = 2.0 * (cy[:, :, None, None] + off[None, None, :, None]) / (self.stride * hp) - 1.0
        grid = torch.stack(torch.broadcast_tensors(gx, gy), dim=-1)  # [R,P,Py,Px,2]
        img = rois[:, 0].long()
        out = torch.empty((r, 3, p * patch * patch), dtype=torch.float32, device=rois.device)
        src = pixels.float()
        for b in img.unique().tolist():
            sel = (img == b).nonzero().flatten()
            g = grid[sel].reshape(1, sel.numel() * p, patch * patch, 2)
            v = F.grid_sample(src[b : b + 1], g, mode="bilinear", padding_mode="border", align_corners=False)
            out[sel] = v.reshape(3, sel.numel(), -1).transpose(0, 1)
        out = (out - RGB_MEAN) / RGB_STD
        # [R,3,P,Py*Px] -> [R,P,3*Py*Px]
        return out.view(r, 3, p, patch * patch).permute(0, 2, 1, 3).reshape(r, p, 3 * patch * patch)
