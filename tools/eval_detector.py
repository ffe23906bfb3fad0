#!/usr/bin/env python
"""Box AP (faster-coco-eval; pycocotools with --evaluator) of a detector spec on a synth val or a COCO split.

    python tools/eval_detector.py shapes --seed 1234 --images 300   # the shipped detector's acceptance check
    python tools/eval_detector.py hf:PATH --annotations A.json --image-dir DIR [--label-map M.json]

With ``--seed``, ``make_synth(DIR, train=0, val=N, seed=SEED)`` is generated into ``--data`` (default
``data/synth_eval_seed{SEED}``; reused when already there) and its val split is evaluated.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec")
    ap.add_argument(
        "--seed", type=int, default=None, help="evaluate a fresh make_synth val split of this seed"
    )
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--annotations", type=Path, default=None)
    ap.add_argument("--image-dir", type=Path, default=None)
    ap.add_argument("--label-map", type=Path, default=None)
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("--evaluator", choices=["faster", "pycocotools"], default="faster")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from mfdetr.detectors.registry import build_detector
    from mfdetr.evaluate.coco_eval import detector_box_ap

    if args.seed is not None:
        from mfdetr.data.synth import make_synth

        root = args.data or REPO / "data" / f"synth_eval_seed{args.seed}_n{args.images}_s{args.size}"
        if not (root / "val" / "annotations.json").is_file():
            make_synth(root, train=0, val=args.images, size=args.size, seed=args.seed)
        ann, img_dir = root / "val" / "annotations.json", root / "val" / "images"
        limit = args.images
    else:
        if args.annotations is None or args.image_dir is None:
            ap.error("give --seed, or --annotations and --image-dir")
        ann, img_dir, limit = args.annotations, args.image_dir, None
    categories = json.loads(Path(ann).read_text())["categories"]
    det = build_detector(args.spec, categories=categories, topk=args.topk, label_map=args.label_map)
    t = time.time()
    res = detector_box_ap(det, ann, img_dir, limit=limit, batch=args.batch, evaluator=args.evaluator)
    res.update(
        {
            "spec": args.spec,
            "annotations": str(ann),
            "seconds": round(time.time() - t, 1),
            "fingerprint": det.fingerprint,
            "evaluator": args.evaluator,
        }
    )
    if args.seed is not None:
        res["synth"] = {"seed": args.seed, "val": args.images, "size": args.size}
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
