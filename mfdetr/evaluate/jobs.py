"""The mask-network step of evaluation and prediction: per image, the top boxes by final score and
their mask probabilities (or pasted crops) as one paste/encode job, and the detector's own box results."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mfdetr.evaluate.coco_results import xyxy_to_xywh
from mfdetr.evaluate.paste import paste_masks_torch


@torch.inference_mode()
def image_jobs(
    model: torch.nn.Module,
    batch: dict[str, Any],
    topk: int = 100,
    mask_score: bool = True,
    mask_threshold: float = 0.5,
    device: torch.device | str = "cpu",
    score_threshold: float | None = None,
    paste_on_device: bool | None = None,
) -> list[dict[str, Any]]:
    """Run the mask network on one batch and build one paste/encode job per image.

    Each job (see :func:`mfdetr.evaluate.coco_results.image_results`) holds the image's top-``topk``
    boxes by final score (``score_threshold`` then drops lower ones), their labels, final scores,
    detection scores and either box-frame probabilities (CPU: pasted later, in a worker) or
    thresholded crops (pasted here, chunked, when ``device`` is not the CPU; ``paste_on_device``
    overrides that choice).
    """
    from mfdetr.cache.batch import batch_to

    dev = torch.device(device)
    b_dev = batch_to(batch, dev)
    out = model(b_dev)
    rows = out["rows"].long()
    logits = out["mask_logits"]
    iou = out.get("iou_pred")
    det = b_dev["scores"][rows[:, 0], rows[:, 1]].float()
    if mask_score and iou is not None:
        final = det * iou.float().clamp(0.0, 1.0)
    else:
        final = det
    rows_c, final_c, det_c = rows.cpu(), final.cpu(), det.cpu()
    boxes_all = batch["boxes"].float()
    labels_all = batch["labels"]
    sizes = batch["orig_size"]
    jobs = []
    for b in range(int(batch["image_id"].shape[0])):
        sel = torch.nonzero(rows_c[:, 0] == b).flatten()
        order = torch.argsort(final_c[sel], descending=True, stable=True)[:topk]
        idx = sel[order]
        if score_threshold is not None:
            idx = idx[final_c[idx] >= score_threshold]
        ks = rows_c[idx, 1]
        h, w = int(sizes[b, 0]), int(sizes[b, 1])
        boxes = boxes_all[b, ks]
        job: dict[str, Any] = {
            "image_id": int(batch["image_id"][b]),
            "index": int(batch["index"][b]),
            "height": h,
            "width": w,
            "boxes": boxes.numpy().astype(np.float32),
            "labels": labels_all[b, ks].numpy().astype(np.int64),
            "scores": final_c[idx].numpy().astype(np.float64),
            "det_scores": det_c[idx].numpy().astype(np.float64),
            "threshold": float(mask_threshold),
        }
        probs = torch.sigmoid(logits[idx.to(logits.device)].float())
        on_device = dev.type != "cpu" if paste_on_device is None else paste_on_device
        if not on_device:
            job["probs"] = probs.cpu().numpy()
        else:
            job["crops"] = paste_masks_torch(probs, boxes.to(dev), h, w, mask_threshold)
        jobs.append(job)
    return jobs


def box_results(batch: dict[str, Any], topk: int = 100) -> list[dict[str, Any]]:
    """The detector's own box results: per image the top-``topk`` valid boxes by detection score."""
    out = []
    for b in range(int(batch["image_id"].shape[0])):
        valid = torch.nonzero(batch["valid"][b]).flatten()
        scores = batch["scores"][b, valid].float()
        ks = valid[torch.argsort(scores, descending=True, stable=True)[:topk]]
        xywh = xyxy_to_xywh(batch["boxes"][b, ks].float().numpy())
        for j, k in enumerate(ks.tolist()):
            out.append(
                {
                    "image_id": int(batch["image_id"][b]),
                    "category_id": int(batch["labels"][b, k]),
                    "bbox": [round(float(v), 3) for v in xywh[j]],
                    "score": float(batch["scores"][b, k]),
                }
            )
    return out
