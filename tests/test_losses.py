"""Mask losses against naive float64 references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mfdetr.model.config import LossConfig
from mfdetr.model.losses import (
    compute_losses,
    iou_regression,
    mask_iou,
    mask_loss,
    point_sample,
    resize_logits,
    sigmoid_bce_dice,
    uncertain_points,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _naive_bce_dice(logits: torch.Tensor, labels: torch.Tensor) -> tuple[list[float], list[float]]:
    bces, dices = [], []
    for r in range(logits.shape[0]):
        xs, ts = logits[r].flatten().tolist(), labels[r].flatten().tolist()
        bce = 0.0
        sp = st = spt = 0.0
        for x, t in zip(xs, ts):
            p = 1 / (1 + math.exp(-x))
            bce += -(t * math.log(p) + (1 - t) * math.log(1 - p))
            sp += p
            st += t
            spt += p * t
        bces.append(bce / len(xs))
        dices.append(1 - (2 * spt + 1) / (sp + st + 1))
    return bces, dices


def _cell_centres(r: int, m: int) -> torch.Tensor:
    c = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], dim=1).expand(r, -1, -1)


def test_point_sample_reads_cell_centres_exactly_and_in_box_frame():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(3, 5, 5, dtype=torch.float64, generator=g)
    vals = point_sample(maps, _cell_centres(3, 5))
    assert torch.allclose(vals, maps.flatten(1), atol=1e-12)
    # (x, y) order: a point at column 4, row 0 reads maps[:, 0, 4]
    pt = torch.tensor([[[(4 + 0.5) / 5, 0.5 / 5]]], dtype=torch.float64).expand(3, 1, 2)
    assert torch.allclose(point_sample(maps, pt)[:, 0], maps[:, 0, 4])
    # nearest: any point inside a cell reads that cell
    pt = torch.tensor([[[0.61, 0.01]]], dtype=torch.float64).expand(3, 1, 2)
    assert torch.equal(point_sample(maps, pt, mode="nearest")[:, 0], maps[:, 0, 3])


def test_bce_dice_formulas_match_naive_float64():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 37, dtype=torch.float64, generator=g) * 3
    labels = (torch.rand(4, 37, generator=g) > 0.5).double()
    bce, dice = sigmoid_bce_dice(logits, labels)
    nb, nd = _naive_bce_dice(logits, labels)
    assert torch.allclose(bce, torch.tensor(nb, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(dice, torch.tensor(nd, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("m_logits", [8, 4])
def test_dense_loss_matches_naive_dense(m_logits):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, m_logits, m_logits, dtype=torch.float64, generator=g) * 2
    targets = torch.rand(3, 8, 8, generator=g) > 0.5
    bce, dice = mask_loss(logits, targets, LossConfig(mask_loss="dense"))
    up = F.interpolate(logits[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    nb, nd = _naive_bce_dice(up, targets.double())
    assert abs(float(bce) - sum(nb) / 3) < 1e-12
    assert abs(float(dice) - sum(nd) / 3) < 1e-12


def test_point_loss_with_every_cell_centre_equals_dense():
    """All points at the target's cell centres: the point loss IS the dense loss."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 16, 16, dtype=torch.float64, generator=g)
    targets = torch.rand(2, 16, 16, generator=g) > 0.4
    coords = _cell_centres(2, 16)
    pl = point_sample(logits, coords)
    pt = point_sample(targets.double(), coords, mode="nearest")
    bce_p, dice_p = sigmoid_bce_dice(pl, pt)
    bce_d, dice_d = mask_loss(logits, targets, LossConfig(mask_loss="dense"))
    assert abs(float(bce_p.mean()) - float(bce_d)) < 1e-12
    assert abs(float(dice_p.mean()) - float(dice_d)) < 1e-12
    # and the point-sampled loss with many random points approaches it (Monte Carlo)
    torch.manual_seed(0)
    bce_s, dice_s = mask_loss(logits, targets, LossConfig(num_points=20000, importance_sample_ratio=0.0))
    up = resize_logits(logits, 64)
    bce_fine, _ = mask_loss(
        up,
        F.interpolate(targets[:, None].double(), size=(64, 64), mode="nearest")[:, 0] > 0.5,
        LossConfig(mask_loss="dense"),
    )
    assert abs(float(bce_s) - float(bce_fine)) < 0.03


def test_importance_sampling_prefers_uncertain_points():
    # logits = distance to the vertical line x = 0.5: uncertainty peaks there
    m = 32
    c = (torch.arange(m) + 0.5) / m
    logits = (20 * (c - 0.5)).abs().view(1, 1, m).expand(2, m, m).clone()
    torch.manual_seed(0)
    pts = uncertain_points(logits, 400, oversample_ratio=3.0, importance_sample_ratio=0.75)
    assert pts.shape == (2, 400, 2) and float(pts.min()) >= 0 and float(pts.max()) <= 1
    imp = pts[:, :300, 0]
    rnd = pts[:, 300:, 0]
    assert float((imp - 0.5).abs().mean()) < 0.5 * float((rnd - 0.5).abs().mean())


def test_mask_iou_matches_naive_and_empty_convention():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(5, 8, 8, generator=g)
    targets = torch.rand(5, 8, 8, generator=g) > 0.5
    targets[4] = False
    logits[4] = -1.0  # both empty -> 1
    iou = mask_iou(logits, targets)
    for r in range(4):
        p, t = logits[r] > 0, targets[r]
        assert abs(float(iou[r]) - float((p & t).sum()) / float((p | t).sum())) < 1e-6
    assert float(iou[4]) == 1.0
    # lower-resolution logits are compared at the target's resolution
    iou2 = mask_iou(logits[:, ::2, ::2].contiguous(), targets)
    up = resize_logits(logits[:, ::2, ::2].contiguous(), 8) > 0
    r = 0
    assert abs(float(iou2[r]) - float((up[r] & targets[r]).sum()) / float((up[r] | targets[r]).sum())) < 1e-6


def test_iou_regression_is_a_divergence():
    t = torch.tensor([0.0, 0.3, 0.9, 1.0], dtype=torch.float64)
    exact = torch.logit(t.clamp(1e-12, 1 - 1e-12))
    assert float(iou_regression(exact, t, "bce")) < 1e-9
    logit = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    loss = iou_regression(logit, t, "bce")
    assert float(loss.detach()) > 0
    loss.backward()
    assert torch.allclose(logit.grad, (0.5 - t) / 4)
    for kind in ("l2", "smooth_l1"):
        assert float(iou_regression(exact, t, kind)) < 1e-9


def test_compute_losses_uses_matched_boxes_for_masks_and_zero_iou_for_unmatched():
    g = torch.Generator().manual_seed(5)
    b, k, m = 2, 3, 8
    batch = {
        "match_ann_id": torch.tensor([[3, -1, 4], [-1, 7, -1]]),
        "mask_targets": torch.rand(b, k, m, m, generator=g) > 0.5,
    }
    rows = torch.tensor([[0, 0], [0, 1], [0, 2], [1, 1], [1, 2]])
    logits = torch.randn(5, m, m, generator=g, requires_grad=True)
    iou_logit = torch.randn(5, generator=g, requires_grad=True)
    out = {"mask_logits": logits, "iou_logit": iou_logit, "iou_pred": iou_logit.sigmoid(), "rows": rows}
    cfg = LossConfig(mask_loss="dense")
    total, parts = compute_losses(out, batch, cfg)
    assert parts["num_masks"] == 3
    # changing an unmatched box's target changes nothing
    batch2 = dict(batch, mask_targets=batch["mask_targets"].clone())
    batch2["mask_targets"][0, 1] = ~batch2["mask_targets"][0, 1]
    total2, _ = compute_losses(out, batch2, cfg)
    assert float(total2.detach()) == float(total.detach())
    # reference: dense BCE + dice over the matched rows, KL IoU loss with targets (iou | 0)
    matched = torch.tensor([True, False, True, True, False])
    tg = batch["mask_targets"][rows[:, 0], rows[:, 1]]
    bce, dice = mask_loss(logits[matched], tg[matched], cfg)
    it = torch.zeros(5)
    it[matched] = mask_iou(logits[matched].detach(), tg[matched])
    ref = bce + dice + iou_regression(iou_logit, it, "bce")
    assert abs(float(total.detach()) - float(ref.detach())) < 1e-6
    total.backward()
    assert logits.grad[1].abs().sum() == 0 and logits.grad[0].abs().sum() > 0
    assert iou_logit.grad.abs().min() > 0
    # iou_unmatched off: the IoU loss ignores unmatched rows
    t3, _ = compute_losses(out, batch, LossConfig(mask_loss="dense", iou_unmatched=False))
    ref3 = bce + dice + iou_regression(iou_logit[matched], it[matched], "bce")
    assert abs(float(t3.detach()) - float(ref3.detach())) < 1e-6


def test_empty_selection_gives_a_zero_loss_with_a_graph():
    logits = torch.zeros(0, 8, 8, requires_grad=True)
    out = {
        "mask_logits": logits,
        "iou_logit": torch.zeros(0, requires_grad=True),
        "iou_pred": torch.zeros(0),
        "rows": torch.zeros(0, 2, dtype=torch.long),
    }
    batch = {
        "match_ann_id": torch.full((1, 2), -1),
        "mask_targets": torch.zeros(1, 2, 8, 8, dtype=torch.bool),
    }
    total, parts = compute_losses(out, batch, LossConfig())
    assert float(total.detach()) == 0.0 and total.requires_grad and parts["num_masks"] == 0
