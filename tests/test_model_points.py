"""Boundary / overlap point sampling of the mask loss and the query shape prior."""

from __future__ import annotations

import pytest
import torch

from mfdetr.model.config import LossConfig
from mfdetr.model.losses import boundary_points, compute_losses, overlap_points
from mfdetr.model.query_encoder import QueryShapePrior

pytestmark = pytest.mark.usefixtures("one_thread")


def _boundary_cells(t: torch.Tensor) -> set[tuple[int, int]]:
    """Cells (row, col) whose clipped 3x3 neighbourhood holds both values: a naive loop."""
    m = t.shape[-1]
    out = set()
    for i in range(m):
        for j in range(m):
            ys, xs = range(max(0, i - 1), min(m, i + 2)), range(max(0, j - 1), min(m, j + 2))
            nb = {bool(t[y, x]) for y in ys for x in xs}
            if len(nb) == 2:
                out.add((i, j))
    return out


def test_boundary_points_lie_on_boundary_cells_and_fall_back_to_uniform():
    g = torch.Generator().manual_seed(0)
    t = torch.zeros(2, 16, 16, dtype=torch.bool)
    t[0, 3:11, 5:14] = True
    t[0, 6:8, 8:10] = False  # a hole: inner boundary cells too
    p = boundary_points(t, 400, g)
    assert p.shape == (2, 400, 2) and float(p.min()) >= 0 and float(p.max()) <= 1
    cells = {(int(y * 16), int(x * 16)) for x, y in p[0].tolist()}
    ref = _boundary_cells(t[0])
    assert cells <= ref and len(cells) > 0.8 * len(ref)  # only boundary cells, and most of them
    # an empty crop has no boundary: uniform over the box
    assert 0.35 < float(p[1].mean()) < 0.65 and float(p[1].std()) > 0.2


def _two_boxes():
    # A = [0,0,20,20] (ann 0), B = [10,0,30,20] (ann 1), C = a duplicate box of A (ann 0), D invalid
    boxes = torch.tensor(
        [[[0, 0, 20, 20], [10, 0, 30, 20], [0, 0, 20, 20], [50, 50, 60, 60]]], dtype=torch.float
    )
    t = torch.zeros(1, 4, 16, 16, dtype=torch.bool)
    t[0, 0] = True
    t[0, 2] = True
    t[0, 1, :, :4] = True  # B's visible pixels: x in 10..15 (inside A) ...
    t[0, 1, :, 12:] = True  # ... and x in 25..30 (outside A)
    return {
        "boxes": boxes,
        "match_ann_id": torch.tensor([[0, 1, 0, -1]]),
        "valid": torch.tensor([[True, True, True, False]]),
        "mask_targets": t,
    }


def test_overlap_points_sample_the_other_instance_inside_the_box():
    batch = _two_boxes()
    g = torch.Generator().manual_seed(0)
    p = overlap_points(batch, torch.tensor([[0, 0], [0, 2]]), 64, oversample=4.0, generator=g)
    assert p.shape == (2, 64, 2)
    # in A's frame B covers x in [0.5, 1]; its visible pixels there are x in [0.5, 0.75]
    x = p[..., 0]
    assert float(x.min()) >= 0.5 and float(x.max()) <= 1.0
    assert float((x < 0.75).float().mean()) > 0.9  # the other instance's own pixels come first
    # the duplicate of A (same annotation) is not "another instance": row 2 also sees B only
    assert torch.allclose(p[0].sort(0).values[:, 0].mean(), p[1].sort(0).values[:, 0].mean(), atol=0.05)


def test_overlap_points_are_uniform_without_an_overlapping_instance():
    batch = _two_boxes()
    batch["match_ann_id"] = torch.tensor([[0, -1, 0, -1]])  # B unmatched: nobody else overlaps A
    p = overlap_points(batch, torch.tensor([[0, 0]]), 400, generator=torch.Generator().manual_seed(1))
    assert 0.4 < float(p[..., 0].mean()) < 0.6 and float(p[..., 0].min()) < 0.1


def test_overlap_points_raise_the_loss_of_a_mask_that_bleeds_into_the_other_instance():
    """A mask right everywhere but on B's visible pixels inside A: the overlap points find the error."""
    batch = _two_boxes()
    batch["mask_targets"][0, 0, :, 8:] = False  # A's visible part: its left half (B covers the right)
    logits = torch.full((1, 32, 32), -8.0)
    logits[0, :, :24] = 8.0  # confident, and wrong on x in [0.5, 0.75): B's visible pixels inside A
    out = {"rows": torch.tensor([[0, 0]]), "mask_logits": logits}
    torch.manual_seed(0)
    base, _ = compute_losses(out, batch, LossConfig(num_points=256, iou_unmatched=False))
    torch.manual_seed(0)
    lc = LossConfig(num_points=256, overlap_points=256, iou_unmatched=False)
    more, _ = compute_losses(out, batch, lc)
    assert torch.isfinite(more) and float(more) > 1.5 * float(base), (float(base), float(more))


def test_boundary_and_overlap_points_keep_gradients_finite():
    batch = _two_boxes()
    logits = torch.randn(3, 16, 16, requires_grad=True)
    out = {"rows": torch.tensor([[0, 0], [0, 1], [0, 2]]), "mask_logits": logits}
    loss, parts = compute_losses(out, batch, LossConfig(num_points=32, boundary_points=16, overlap_points=16))
    loss.backward()
    assert torch.isfinite(logits.grad).all() and float(logits.grad.abs().sum()) > 0
    assert parts["num_masks"] == 3


def test_query_prior_starts_at_zero_and_follows_the_query():
    torch.manual_seed(0)
    prior = QueryShapePrior(16, 4)
    q = torch.randn(3, 16)
    assert torch.equal(prior(q, 12), torch.zeros(3, 12, 12))  # zero-init: training starts feature-only
    target = torch.zeros(3, 12, 12)
    target[0, :6] = 1.0  # a different template per query
    target[1, :, 6:] = 1.0
    opt = torch.optim.Adam(prior.parameters(), 1e-2)
    for _ in range(300):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(prior(q, 12), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pred = prior(q, 12) > 0
    assert float((pred == target.bool()).float().mean()) > 0.95  # learns per-query shapes
