"""Hugging Face DETR-family adapter: a local ``save_pretrained`` folder -> :class:`FrozenDetector`.

Supported (``config.model_type`` -> class): see :data:`SUPPORTED`. What the adapter does, per image:

- preprocessing through the checkpoint's own image processor (``AutoImageProcessor`` from the folder, or the
  class's default processor when the folder has no ``preprocessor_config.json``);
- boxes / scores / labels exactly as ``processor.post_process_object_detection(outputs, threshold,
  target_sizes=original sizes)`` computes them (then clipped to the image), but with the query index kept:
  sigmoid models (Conditional / Deformable DETR, RT-DETR, RT-DETRv2, D-FINE) take a top-k over query x class,
  DETR takes the softmax without the no-object class, max over classes per query, then a top-k over queries;
- ``queries[k]`` = ``outputs.last_hidden_state[query of box k]`` (the last decoder layer's embedding);
- features: encoder levels ``e{stride}`` (the encoder's multi-scale output as maps) and backbone levels
  ``b{stride}`` (the deepest backbone stage of each stride, read by forward hooks), each cropped to
  ``ceil(h_in / s) x ceil(w_in / s)``.

Batching: images are grouped by their network-input size and each group is ONE batched forward without padding,
so an image's output never depends on which other images share its batch (DETR-family backbones see padding
pixels, so padded batches would change the features and the boxes). Where the network needs a padded input anyway
(a processor with ``pad_size``, or RT-DETR-style models whose input is not a multiple of 32), padding is
bottom-right and boxes and features are relative to the unpadded input.

Files: this module holds the adapter (:class:`HFDetector`, ``build_hf_detector``); ``hf_load.py`` the supported
classes and checkpoint loading, ``hf_labels.py`` the label mapping, ``hf_features.py`` the reading of the model's
internals (backbone stages, encoder maps, strides) and ``hf_processing.py`` the input sizes and top-k selection.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from mfdetr.detectors.base import DetectorOutput, LevelSpec
from mfdetr.detectors.hf_features import (
    backbone_module,
    first_tensor,
    stage_modules,
    stride_of,
    encoder_maps,
    probe_size,
)
from mfdetr.detectors.hf_labels import normalize_label_name, resolve_label_map  # noqa: F401  (re-export)
from mfdetr.detectors.hf_load import SUPPORTED, folder_fingerprint_parts, load_hf_folder, supported_classes
from mfdetr.detectors.hf_processing import valid_size, analytic_input_size, select_topk
from mfdetr.errors import MfdetrError
from mfdetr.utils.hashing import sha256_json


class HFDetector:
    """A :class:`~mfdetr.detectors.base.FrozenDetector` over a Hugging Face DETR-family model."""

    def __init__(
        self,
        model,
        processor,
        model_type: str,
        *,
        spec: str,
        categories: Sequence[dict[str, Any]] | None = None,
        levels: Sequence[str] | None = None,
        topk: int = 100,
        label_map: str | Path | dict | None = None,
        device: str | torch.device = "cpu",
        fingerprint_parts: dict[str, str] | None = None,
    ) -> None:
        if model_type not in SUPPORTED:
            raise MfdetrError(f"model type {model_type!r} is not supported; supported: {', '.join(supported_classes())}")
        if int(topk) < 1:
            raise MfdetrError(f"topk must be >= 1 (got {topk})")
        self.spec = spec
        self.model = model.eval()
        self.processor = processor
        self.model_type = model_type
        self.score_kind = SUPPORTED[model_type][2]
        if model_type.startswith("rt_detr") or model_type == "d_fine":
            if not getattr(model.config, "use_focal_loss", True):
                self.score_kind = "softmax_drop_last"  # what RTDetrImageProcessor does with use_focal_loss=False
        self.multiple = 32 if SUPPORTED[model_type][3] else 1
        self.topk = int(topk)
        self.device = torch.device("cpu")
        cfg = model.config
        self.id2label = {int(k): v for k, v in cfg.id2label.items()}
        self.num_classes = len(self.id2label)
        self.label_map = resolve_label_map(self.id2label, categories, label_map, f"{spec} ({type(model).__name__})")
        lut = torch.full((self.num_classes,), -1, dtype=torch.int64)
        for k, v in (self.label_map or {i: i for i in self.id2label}).items():
            if 0 <= k < self.num_classes:
                lut[k] = v
        self._lut = lut
        self._keep_class = lut >= 0

        # hooks: backbone stages (b*) and encoder spatial shapes (Deformable DETR / DETR)
        self._captured: dict[str, Any] = {}
        self._wanted_stages: set[int] | None = None  # None: capture every stage (the probe)
        self._hooks = []
        bb = backbone_module(model)
        self._stage_mods = stage_modules(bb) if bb is not None else []
        for i, m in enumerate(self._stage_mods):
            self._hooks.append(m.register_forward_hook(self._make_stage_hook(i)))
        inner = model.model
        if model_type == "deformable_detr":
            self._hooks.append(inner.encoder.register_forward_pre_hook(self._encoder_pre_hook, with_kwargs=True))
        elif model_type in ("detr", "conditional_detr"):
            self._hooks.append(inner.input_projection.register_forward_hook(self._proj_hook))

        self._probe_levels()  # fills self._all_levels (LevelSpec by name) and self._stage_for_b
        available = list(self._all_levels)
        if levels is None:
            chosen = [n for n in available if n == "b4"] + [n for n in available if n.startswith("e")]
        else:
            chosen = list(levels)
            bad = [n for n in chosen if n not in self._all_levels]
            if bad:
                raise MfdetrError(f"unknown level(s) {bad} for {spec}; available: {available}")
            if len(set(chosen)) != len(chosen):
                raise MfdetrError(f"levels listed twice: {chosen}")
        self.levels: list[LevelSpec] = [self._all_levels[n] for n in chosen]
        self._wanted_stages = {self._stage_for_b[n] for n in chosen if n in self._stage_for_b}
        self.query_dim = int(getattr(cfg, "d_model", None) or getattr(cfg, "hidden_size"))

        self._init_input_size()
        options = {
            "adapter": "hf/1",
            "model_type": model_type,
            "levels": chosen,
            "topk": self.topk,
            "label_map": sorted(self.label_map.items()) if self.label_map is not None else None,
        }
        self.fingerprint = sha256_json({"files": fingerprint_parts or {}, "options": options})
        self.to(device)

    # -------------------------------------------------------------------------------------------- hooks

    def _make_stage_hook(self, i: int):
        def hook(_module, _inputs, output):
            if self._wanted_stages is not None and i not in self._wanted_stages:
                return
            t = first_tensor(output)
            if t is not None and t.dim() == 4:
                self._captured.setdefault("stages", {})[i] = t

        return hook

    def _encoder_pre_hook(self, _module, args, kwargs):
        shapes = kwargs.get("spatial_shapes_list")
        if shapes is None and kwargs.get("spatial_shapes") is not None:
            shapes = [tuple(int(v) for v in s) for s in kwargs["spatial_shapes"].tolist()]
        self._captured["enc_shapes"] = [tuple(int(v) for v in s) for s in shapes]

    def _proj_hook(self, _module, _inputs, output):
        self._captured["enc_shapes"] = [tuple(output.shape[-2:])]

    # -------------------------------------------------------------------------------------------- levels

    def _probe_size(self) -> tuple[int, int]:
        return probe_size(self.model.config, self.processor)

    @torch.inference_mode()
    def _probe_levels(self) -> None:
        ph, pw = self._probe_size()
        x = torch.zeros((1, 3, ph, pw))
        self._captured = {}
        out = self.model(pixel_values=x, pixel_mask=torch.ones((1, ph, pw), dtype=torch.int64))
        enc = self._encoder_maps(out, 1)
        levels: dict[str, LevelSpec] = {}
        stage_for_b: dict[str, int] = {}
        for i, t in sorted(self._captured.get("stages", {}).items()):
            s = stride_of(ph, t.shape[-2])
            stage_for_b[f"b{s}"] = i  # deepest module of each stride wins
            levels[f"b{s}"] = LevelSpec(f"b{s}", s, int(t.shape[1]))
        enc_levels = {}
        for t in enc:
            s = stride_of(ph, t.shape[-2])
            if f"e{s}" in enc_levels:
                raise RuntimeError(f"two encoder levels of stride {s}")
            enc_levels[f"e{s}"] = LevelSpec(f"e{s}", s, int(t.shape[1]))
        self._stage_for_b = stage_for_b
        self._enc_names = list(enc_levels)
        self._all_levels = {**dict(sorted(levels.items(), key=lambda kv: kv[1].stride)), **enc_levels}
        self._captured = {}

    def _encoder_maps(self, out, batch: int) -> list[Tensor]:
        """The encoder's output as a list of [B,C,h,w] maps, finest first."""
        return encoder_maps(out, self._captured.get("enc_shapes"), batch)

    # -------------------------------------------------------------------------------------------- sizes

    def _init_input_size(self) -> None:
        """Use the processor's resize rule analytically when it matches the processor on test sizes."""
        self._analytic = True
        for hw in ((37, 53), (61, 45), (64, 64)):
            try:
                measured = self._measured_size(hw)
            except Exception:  # noqa: BLE001 - e.g. a pad_size smaller than this test size's resize
                continue
            if self._analytic_size(hw) != measured:
                self._analytic = False
                break

    def _analytic_size(self, orig: tuple[int, int]) -> tuple[int, int] | None:
        return analytic_input_size(self.processor, orig)

    @lru_cache(maxsize=4096)  # noqa: B019 - one detector lives for the whole run
    def _measured_size(self, orig: tuple[int, int]) -> tuple[int, int]:
        with torch.inference_mode():
            enc = self.processor(images=[torch.zeros((3, *orig), dtype=torch.uint8)], return_tensors="pt")
        return valid_size(enc)[0]

    def input_size(self, orig_size: tuple[int, int]) -> tuple[int, int]:
        orig = (int(orig_size[0]), int(orig_size[1]))
        if self._analytic:
            r = self._analytic_size(orig)
            if r is not None:
                return r
        return self._measured_size(orig)

    # -------------------------------------------------------------------------------------------- run

    def to(self, device: torch.device | str) -> "HFDetector":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def detect(self, images: list[Tensor]) -> list[DetectorOutput]:
        for i, im in enumerate(images):
            if not isinstance(im, Tensor) or im.dim() != 3 or im.shape[0] != 3 or im.dtype != torch.uint8:
                got = f"{tuple(im.shape)} {im.dtype}" if isinstance(im, Tensor) else type(im).__name__
                raise MfdetrError(f"detect: image {i} must be a uint8 [3,H,W] RGB tensor, got {got}")
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(self.input_size(tuple(im.shape[-2:])), []).append(i)
        results: list[DetectorOutput | None] = [None] * len(images)
        with torch.inference_mode():
            for idx in groups.values():
                for i, r in zip(idx, self._detect_group([images[i] for i in idx])):
                    results[i] = r
        return results  # type: ignore[return-value]

    def _run_model(self, images: list[Tensor]):
        """Processor + forward; returns (outputs, valid input sizes, padded size, captured)."""
        enc = self.processor(images=[im.cpu() for im in images], return_tensors="pt")
        pv = enc["pixel_values"]
        sizes = valid_size(enc)
        mask = enc.get("pixel_mask")
        hp, wp = pv.shape[-2:]
        m = self.multiple
        if hp % m or wp % m:
            H, W = -(-hp // m) * m, -(-wp // m) * m
            pv = torch.nn.functional.pad(pv, (0, W - wp, 0, H - hp))
            if mask is not None:
                mask = torch.nn.functional.pad(mask, (0, W - wp, 0, H - hp))
        kwargs = {"pixel_values": pv.to(self.device)}
        if mask is not None:
            kwargs["pixel_mask"] = mask.to(self.device)
        self._captured = {}
        out = self.model(**kwargs)
        cap, self._captured = self._captured, {}
        return out, sizes, tuple(pv.shape[-2:]), cap

    def _scores(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(scores [B,K], labels [B,K] model ids, query index [B,K]) with unmapped classes excluded."""
        return select_topk(logits, self._keep_class, self.score_kind, self.topk)

    def _detect_group(self, images: list[Tensor]) -> list[DetectorOutput]:
        out, sizes, (hp, wp), cap = self._run_model(images)
        b = len(images)
        scores, labels, qidx = self._scores(out.logits)
        boxes = out.pred_boxes  # normalized cxcywh
        cx, cy, w, h = boxes.unbind(-1)
        xyxy = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
        queries = out.last_hidden_state
        self._captured = cap
        enc_maps = self._encoder_maps(out, b)
        self._captured = {}
        stages = cap.get("stages", {})
        results = []
        for j, im in enumerate(images):
            H0, W0 = int(im.shape[-2]), int(im.shape[-1])
            h_in, w_in = sizes[j]
            sc, lab, q = scores[j], labels[j], qidx[j]
            valid = sc >= 0  # -1.0 marks excluded classes (only when fewer mapped candidates than topk)
            sc, lab, q = sc[valid], lab[valid], q[valid]
            bx = xyxy[j].index_select(0, q)
            # post_process_object_detection: normalized xyxy * (W0, H0); boxes normalized to the padded input
            # (RT-DETR-style models padded to a multiple of 32 here) are first brought to the unpadded one
            fx = wp / w_in if (self.multiple > 1 and wp != w_in) else 1.0
            fy = hp / h_in if (self.multiple > 1 and hp != h_in) else 1.0
            scale_fct = torch.tensor([W0 * fx, H0 * fy, W0 * fx, H0 * fy], dtype=torch.float32, device=bx.device)
            bx = bx.float() * scale_fct
            bx[:, 0::2] = bx[:, 0::2].clamp(0, W0)
            bx[:, 1::2] = bx[:, 1::2].clamp(0, H0)
            feats = {}
            for lv in self.levels:
                if lv.name.startswith("e"):
                    t = enc_maps[self._enc_names.index(lv.name)][j]
                else:
                    t = stages[self._stage_for_b[lv.name]][j]
                fh, fw = -(-h_in // lv.stride), -(-w_in // lv.stride)
                feats[lv.name] = t[:, :fh, :fw].float().contiguous()
            results.append(
                DetectorOutput(
                    boxes=bx.contiguous(),
                    scores=sc.float().contiguous(),
                    labels=self._lut.to(lab.device)[lab].contiguous(),
                    queries=queries[j].index_select(0, q).float().contiguous(),
                    features=feats,
                    scale=(w_in / W0, h_in / H0),
                    input_size=(h_in, w_in),
                    orig_size=(H0, W0),
                    extras={"query_index": q.contiguous(), "model_label": lab.contiguous()},
                )
            )
        return results

    def __repr__(self) -> str:
        lv = ", ".join(f"{x.name}(s{x.stride},c{x.channels})" for x in self.levels)
        return f"HFDetector({self.spec!r}, {type(self.model).__name__}, levels=[{lv}], topk={self.topk})"


def build_hf_detector(
    folder: str | Path,
    *,
    spec: str | None = None,
    categories=None,
    device: str | torch.device = "cpu",
    levels=None,
    topk: int = 100,
    label_map=None,
) -> HFDetector:
    folder = Path(folder)
    model, processor, mt = load_hf_folder(folder)
    return HFDetector(
        model,
        processor,
        mt,
        spec=spec or f"hf:{folder}",
        categories=categories,
        levels=levels,
        topk=topk,
        label_map=label_map,
        device=device,
        fingerprint_parts=folder_fingerprint_parts(folder),
    )
