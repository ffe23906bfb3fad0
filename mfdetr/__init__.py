"""mfdetr: turn a frozen DETR-family detector into an instance segmenter (Mask Frozen-DETR).

Stage one (``mfdetr extract``) runs the frozen detector once and writes a Zarr cache; stage two
(``mfdetr train-from-cache``) trains the light mask network from that cache alone.
"""

__version__ = "0.1.0"
