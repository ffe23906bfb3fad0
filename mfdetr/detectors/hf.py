"""Hugging Face DETR-family adapter: a local ``save_pretrained`` folder -> :class:`FrozenDetector`.

Any object-detection head of transformers loads (``hf_load.py``), and a probe forward at load checks that it
exposes what the mask network needs, by its outputs, not by its class: class ``logits``, ``pred_boxes``, the
decoder's ``last_hidden_state`` per query, and feature maps (``hf_features.py``). Per image:

- preprocessing through the checkpoint's own image processor (``AutoImageProcessor`` from the folder, or
  transformers' default processor of the model type when the folder has no ``preprocessor_config.json``);
- boxes / scores / labels exactly as ``processor.post_process_object_detection(outputs, threshold,
  target_sizes=original sizes)`` computes them (then clipped to the image), with the query index kept. The one
  per-family difference, read from the logits' width: a no-object column (DETR, Table Transformer) -> softmax
  without it, best class per query, top-k over queries; otherwise (focal-loss models) a sigmoid and a top-k
  over query x class (RT-DETR-family ``use_focal_loss=False``: softmax as its processor does);
- ``queries[k]`` = ``outputs.last_hidden_state[query of box k]`` (the last decoder layer's embedding). Models
  run in eval mode: LW-DETR / RF-DETR's extra ``group_detr`` query groups exist only in training;
- features: memory levels ``e{stride}`` and backbone levels ``b{stride}`` (see ``hf_features.py``), each
  cropped to ``ceil(h_in / s) x ceil(w_in / s)``. Default: ``b4`` (when the backbone has it) + every ``e``.

Batching: images are grouped by their network-input size and each group is ONE batched forward without
padding, so an image's output never depends on which other images share its batch (DETR-family backbones
see padding pixels). Where the network needs a padded input anyway (a processor with ``pad_size``; a model
that only runs on multiples of its coarsest stride, found at load: RT-DETR family, windowed ViTs), padding
is bottom-right and boxes and features are relative to the unpadded input.

Files: this module holds the adapter (:class:`HFDetector`, ``build_hf_detector``); ``hf_load.py`` checkpoint
loading, ``hf_labels.py`` the label mapping, ``hf_features.py`` the reading of the model's internals and
``hf_processing.py`` the input sizes and top-k selection.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mfdetr.detectors.base import DetectorOutput, LevelSpec
from mfdetr.detectors.hf_features import (
    backbone_module,
    backbone_output_maps,
    check_outputs,
    decoder_memory_shapes,
    decoder_module,
    first_tensor,
    memory_maps,
    probe_size,
    stage_modules,
    stride_of,
)
from mfdetr.detectors.hf_labels import resolve_label_map
from mfdetr.detectors.hf_load import folder_fingerprint_parts, load_hf_folder
from mfdetr.detectors.hf_processing import analytic_input_size, select_topk, valid_size
from mfdetr.errors import MfdetrError
from mfdetr.utils.hashing import sha256_json

_PROBE_ODD = 100  # side of the odd-size probe that tells whether a model needs padded inputs


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
        if int(topk) < 1:
            raise MfdetrError(f"topk must be >= 1 (got {topk})")
        self.spec = spec
        self.model = model.eval()
        self.processor = processor
        self.model_type = model_type
        self.topk = int(topk)
        self.device = torch.device("cpu")
        cfg = model.config
        self.id2label = {int(k): v for k, v in cfg.id2label.items()}
        self.num_classes = len(self.id2label)
        where = f"{spec} ({type(model).__name__})"
        self.label_map = resolve_label_map(self.id2label, categories, label_map, where)
        lut = torch.full((self.num_classes,), -1, dtype=torch.int64)
        for k, v in (self.label_map or {i: i for i in self.id2label}).items():
            if 0 <= k < self.num_classes:
                lut[k] = v
        self._lut = lut
        self._keep_class = lut >= 0
        self._install_hooks()
        self._probe_levels()  # fills _all_levels, _stage_for_b, _enc_names, score_kind, query_dim
        self.multiple = self._find_input_multiple()
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

        self._init_input_size()
        options = {
            "adapter": "hf/2",
            "model_type": model_type,
            "levels": chosen,
            "topk": self.topk,
            "label_map": sorted(self.label_map.items()) if self.label_map is not None else None,
        }
        self.fingerprint = sha256_json({"files": fingerprint_parts or {}, "options": options})
        self.to(device)

    # -------------------------------------------------------------------------------------------- hooks

    def _install_hooks(self) -> None:
        """Backbone stages and outputs (``b*``), the decoder's cross-attention memory (``e*``)."""
        self._captured: dict[str, Any] = {}
        self._wanted_stages: set[int] | None = None  # None: capture every stage (the probe)
        self._hooks = []
        bb = backbone_module(self.model)
        self._stage_mods = stage_modules(bb) if bb is not None else []
        for i, m in enumerate(self._stage_mods):
            self._hooks.append(m.register_forward_hook(self._make_stage_hook(i)))
        if bb is not None:
            self._hooks.append(bb.register_forward_hook(self._backbone_hook))
        dec = decoder_module(self.model)
        if dec is not None:
            self._hooks.append(dec.register_forward_pre_hook(self._decoder_pre_hook, with_kwargs=True))

    def _keep_stage(self, i: int, t) -> None:
        if self._wanted_stages is not None and i not in self._wanted_stages:
            return
        if isinstance(t, Tensor) and t.dim() == 4:
            self._captured.setdefault("stages", {})[i] = t

    def _make_stage_hook(self, i: int):
        def hook(_module, _inputs, output):
            self._keep_stage(i, first_tensor(output))

        return hook

    def _backbone_hook(self, _module, _inputs, output):
        maps = backbone_output_maps(output)
        self._captured["backbone_out"] = maps
        for j, t in enumerate(maps):  # after the stages: the deepest module of their stride
            self._keep_stage(len(self._stage_mods) + j, t)

    def _decoder_pre_hook(self, _module, args, kwargs):
        mem = kwargs.get("encoder_hidden_states")
        if isinstance(mem, Tensor):
            self._captured["memory"] = mem
            self._captured["memory_shapes"] = decoder_memory_shapes(kwargs)

    # -------------------------------------------------------------------------------------------- levels

    def _forward_probe(self, ph: int, pw: int):
        self._captured = {}
        x = torch.zeros((1, 3, ph, pw), device=next(self.model.parameters()).device)
        mask = torch.ones((1, ph, pw), dtype=torch.int64, device=x.device)
        out = self.model(pixel_values=x, pixel_mask=mask)
        cap, self._captured = self._captured, {}
        return out, cap

    @torch.inference_mode()
    def _probe_levels(self) -> None:
        ph, pw = probe_size(self.model.config, self.processor)
        out, cap = self._forward_probe(ph, pw)
        self.score_kind, self.query_dim = check_outputs(out, self.model, self.num_classes, self.spec)
        levels: dict[str, LevelSpec] = {}
        stage_for_b: dict[str, int] = {}
        self._stage_stride: dict[int, int] = {}
        for i, t in sorted(cap.get("stages", {}).items()):
            s = self._stage_stride[i] = self._stride(ph, pw, t)
            stage_for_b[f"b{s}"] = i  # deepest module of each stride wins
            levels[f"b{s}"] = LevelSpec(f"b{s}", s, int(t.shape[1]))
        enc_levels = {}
        for t in memory_maps(out, cap, 1):
            s = self._stride(ph, pw, t)
            if f"e{s}" in enc_levels:
                raise RuntimeError(f"two memory levels of stride {s}")
            enc_levels[f"e{s}"] = LevelSpec(f"e{s}", s, int(t.shape[1]))
        if not enc_levels and not levels:
            raise MfdetrError(
                f"{self.spec}: {type(self.model).__name__} exposes no feature maps for the mask network: no "
                "multi-scale memory (a list of maps as encoder_last_hidden_state, or a decoder fed "
                "encoder_hidden_states) and no backbone stages"
            )
        self._stage_for_b = stage_for_b
        self._enc_names = list(enc_levels)
        self._all_levels = {**dict(sorted(levels.items(), key=lambda kv: kv[1].stride)), **enc_levels}

    @staticmethod
    def _stride(ph: int, pw: int, t: Tensor) -> int:
        s, sw = stride_of(ph, t.shape[-2]), stride_of(pw, t.shape[-1])
        if s != sw:
            raise RuntimeError(f"a {tuple(t.shape[-2:])} map of a {ph}x{pw} input has strides {s} and {sw}")
        return s

    @torch.inference_mode()
    def _find_input_multiple(self) -> int:
        """1 when the model runs on odd input sizes and gives every level ``ceil(size / stride)`` cells, else
        the smallest multiple of the coarsest level stride (x1, 2, 4, 8) that does: inputs are then padded
        bottom-right to it (RT-DETR's fixed FPN shapes; a ViT's patch x window grid)."""
        coarsest = max(lv.stride for lv in self._all_levels.values())
        for m in (1, coarsest, 2 * coarsest, 4 * coarsest, 8 * coarsest):
            # odd multiples of m (not multiples of 2m); for m = 1 also odd multiples of 16 (+ a remainder)
            h, w = (115, 83) if m == 1 else (m * (max(1, -(-_PROBE_ODD // m)) | 1),) * 2
            w = w if m == 1 else h + 2 * m
            try:
                out, cap = self._forward_probe(h, w)
                mem = memory_maps(out, cap, 1)
            except Exception:  # noqa: BLE001 - a size the model cannot take
                continue
            strides = [self._all_levels[n].stride for n in self._enc_names]
            stages = cap.get("stages", {}).items()
            maps = [(t, self._stage_stride[i]) for i, t in stages if i in self._stage_stride]
            if len(mem) == len(strides) and all(
                t.shape[-2:] == (-(-h // s), -(-w // s)) for t, s in maps + list(zip(mem, strides))
            ):
                return m
        return coarsest  # e.g. anchors fixed to one input size (anchor_image_size): the processor gives it

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

    def to(self, device: torch.device | str) -> HFDetector:
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
        return out, sizes, tuple(pv.shape[-2:]), cap, mask is None

    def _scores(self, logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(scores [B,K], labels [B,K] model ids, query index [B,K]) with unmapped classes excluded."""
        return select_topk(logits, self._keep_class, self.score_kind, self.topk)

    def _detect_group(self, images: list[Tensor]) -> list[DetectorOutput]:
        out, sizes, (hp, wp), cap, no_mask = self._run_model(images)
        b = len(images)
        scores, labels, qidx = self._scores(out.logits)
        boxes = out.pred_boxes  # normalized cxcywh
        cx, cy, w, h = boxes.unbind(-1)
        xyxy = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
        queries = out.last_hidden_state
        enc_maps = memory_maps(out, cap, b)
        stages = cap.get("stages", {})
        results = []
        for j, im in enumerate(images):
            H0, W0 = int(im.shape[-2]), int(im.shape[-1])
            h_in, w_in = sizes[j]
            sc, lab, q = scores[j], labels[j], qidx[j]
            valid = sc >= 0  # -1.0 marks excluded classes (only when fewer mapped candidates than topk)
            sc, lab, q = sc[valid], lab[valid], q[valid]
            bx = xyxy[j].index_select(0, q)
            # post_process_object_detection: normalized xyxy * (W0, H0). A model fed no pixel_mask (RT-DETR
            # family) normalizes to the whole input, which is padded here when it needs a size multiple: first
            # bring such boxes to the unpadded input (models with a mask normalize to the valid region)
            fx = wp / w_in if no_mask else 1.0
            fy = hp / h_in if no_mask else 1.0
            scale_fct = torch.tensor([W0 * fx, H0 * fy] * 2, dtype=torch.float32, device=bx.device)
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
                t = t[:, :fh, :fw]
                if t.shape[-2:] != (fh, fw):  # a patch embedding floors a side the model let through unpadded
                    t = torch.nn.functional.pad(t, (0, fw - t.shape[-1], 0, fh - t.shape[-2]))
                feats[lv.name] = t.float().contiguous()
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
