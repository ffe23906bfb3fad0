"""Box AP of the detector being trained (in the network frame) and of the saved folder (through ``hf:``)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch


def _ground_truth(targets: list[dict], size: int, num_labels: int) -> dict:
    """A COCO dataset dict of the targets (normalized cxcywh -> pixel xywh, labels 1-based)."""
    gt = {"images": [], "annotations": [], "categories": [{"id": i + 1} for i in range(num_labels)]}
    aid = 1
    for i, t in enumerate(targets):
        gt["images"].append({"id": i + 1, "height": size, "width": size})
        for lab, b in zip(t["class_labels"].tolist(), t["boxes"].tolist()):
            cx, cy, w, h = (v * size for v in b)
            gt["annotations"].append(
                {
                    "id": aid,
                    "image_id": i + 1,
                    "category_id": lab + 1,
                    "bbox": [cx - w / 2, cy - h / 2, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
            aid += 1
    return gt


def _detections(model, pix: torch.Tensor, size: int, batch: int) -> list[dict]:
    """COCO results of the model's top-100 (query, class) sigmoid scores per image."""
    dets = []
    for s in range(0, len(pix), batch):
        out = model(pixel_values=pix[s : s + batch].float() / 255.0)
        prob = out.logits.sigmoid()
        n, q, c = prob.shape
        sc, idx = prob.flatten(1).topk(min(100, q * c), dim=1)
        lab = idx % c
        qi = idx // c
        bx = out.pred_boxes.gather(1, qi[..., None].expand(-1, -1, 4)) * size
        for j in range(n):
            for k in range(sc.shape[1]):
                cx, cy, w, h = bx[j, k].tolist()
                dets.append(
                    {
                        "image_id": s + j + 1,
                        "category_id": int(lab[j, k]) + 1,
                        "bbox": [cx - w / 2, cy - h / 2, w, h],
                        "score": float(sc[j, k]),
                    }
                )
    return dets


@torch.inference_mode()
def quick_ap(model, pix: torch.Tensor, targets: list[dict], size: int, batch: int = 25) -> float:
    """COCO box AP (pycocotools) of the model's top-100 sigmoid detections per image, in the network frame."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    was_training = model.training
    model.eval()
    gt = _ground_truth(targets, size, model.config.num_labels)
    dets = _detections(model, pix, size, batch)
    model.train(was_training)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        cdt = coco.loadRes(dets)
        ev = COCOeval(coco, cdt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    quick_ap.last_stats = [round(float(v), 3) for v in ev.stats]
    return float(ev.stats[0])


def acceptance_ap(folder: Path, seed: int, images: int, size: int, data_root: Path) -> dict:
    """Box AP of the saved folder through the ``hf:`` adapter on a fresh synth val split of ``seed``."""
    from mfdetr.data.synth import make_synth
    from mfdetr.detectors.registry import build_detector
    from mfdetr.evaluate.coco_eval import detector_box_ap as box_ap

    root = data_root / f"synth_eval_seed{seed}_n{images}_s{size}"
    if not (root / "val" / "annotations.json").is_file():
        make_synth(root, train=0, val=images, size=size, seed=seed)
    ann = root / "val" / "annotations.json"
    det = build_detector(f"hf:{folder}", categories=json.loads(ann.read_text())["categories"])
    res = box_ap(det, ann, root / "val" / "images")
    return {"synth": f"make_synth(train=0, val={images}, size={size}, seed={seed})", **res}
