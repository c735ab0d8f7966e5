"""Capture: hooks at the attention seams -> one HDF5 file per run (q, k, v, lse, pooled views, provenance).

    from toolkit.capture import capture, open_capture, Selection
    sampler = SelfForcingSampler()                       # the run's sampler gives its layout (toolkit.models.sampling)
    with capture(model, select=Selection(layers="8"), out="run.h5", layout=sampler.layout(model.cfg, grid)) as rec:
        sampler.sample(model, noise, context)
    cap = open_capture("run.h5"); rec = cap.record(step=3, chunk=6, layer=8)

Modules: ``selection`` (what to record, validated before the model loads), ``recorder`` (the seam hook and the
``capture`` context manager), ``store`` (file layout and the writer thread), ``reader`` (``open_capture``),
``pooled`` (frame×frame and offset views), ``adapters`` (capture from other DiTs), ``xarray_backend``
(``xarray.open_dataset(path, engine="toolkit")``: bf16 bits decoded).
"""

from toolkit.capture.adapters import SDPAAdapter
from toolkit.capture.reader import Capture, Record, RecordKey, open_capture
from toolkit.capture.recorder import Recorder, capture
from toolkit.capture.selection import Plan, RunLayout, Selection, resolve

__all__ = ["Capture", "Plan", "Record", "RecordKey", "Recorder", "RunLayout", "SDPAAdapter", "Selection", "capture",
           "open_capture", "resolve"]
