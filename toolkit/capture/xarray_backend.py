"""An xarray backend for capture files: ``xarray.open_dataset(path, engine="toolkit")``.

Plain ``engine="h5netcdf"`` shows bf16 tensors as the raw ``uint16`` bit patterns the file stores (HDF5 has no bf16
type, and CF decoding attributes — ``scale_factor``, ``add_offset`` — cannot express a bit shift). This engine reads
through h5netcdf and then decodes every variable whose ``dtype_logical`` attribute is ``bfloat16`` or ``float16`` to
float32, lazily (element-wise on each indexed or dask block), so the values equal ``Record.q()`` / ``k()`` / ``v()``
bit for bit. It is registered under the name ``toolkit`` through the ``xarray.backends`` entry point group
(``pyproject.toml``); ``Capture.dataset`` uses it directly.
"""

from __future__ import annotations

import os

import numpy as np
from xarray.backends import BackendEntrypoint

DECODED_LOGICAL = ("bfloat16", "float16")


def bf16_bits_to_float32(bits) -> np.ndarray:
    """Raw bf16 bit patterns (uint16 / int16) -> float32 (``float32 bits = uint32(x) << 16``), exactly as torch widens
    bf16."""
    bits = np.asarray(bits)
    return (bits.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _float16_to_float32(x) -> np.ndarray:
    return np.asarray(x).astype(np.float32)


def decode_variable(var):
    """``var`` (an ``xarray.Variable``) with stored bf16 bits / float16 values decoded to float32, lazily; any other
    variable unchanged."""
    import xarray as xr
    from xarray.coding.variables import lazy_elemwise_func

    logical = var.attrs.get("dtype_logical")
    if logical not in DECODED_LOGICAL or var.dtype == np.float32:
        return var
    func = bf16_bits_to_float32 if logical == "bfloat16" else _float16_to_float32
    attrs = dict(var.attrs)
    attrs.pop("decode", None)  # applied
    attrs["decoded_from"] = f"{logical} stored as {var.dtype}"
    return xr.Variable(var.dims, lazy_elemwise_func(var._data, func, np.dtype(np.float32)), attrs,
                       dict(var.encoding))


def decode_dataset(ds):
    """Decode every bf16 / float16 tensor variable of a capture dataset to float32 (lazy)."""
    variables = {name: decode_variable(var) for name, var in ds.variables.items()}
    out = ds.copy()
    for name, var in variables.items():
        if var is not ds.variables[name]:
            out[name] = var
    out.set_close(ds._close)
    return out


class ToolkitBackendEntrypoint(BackendEntrypoint):
    """``xarray.open_dataset(path, engine="toolkit")``: a capture file with bf16 / float16 tensors decoded to
    float32 (set ``decode_bits=False`` for the stored representation)."""

    description = "toolkit capture files (HDF5) with bf16 bit patterns decoded to float32"
    url = "docs/capture-format.md"
    open_dataset_parameters = ("filename_or_obj", "drop_variables", "decode_bits", "mask_and_scale", "decode_times",
                               "decode_coords", "lock", "phony_dims")

    def open_dataset(self, filename_or_obj, *, drop_variables=None, decode_bits=True, mask_and_scale=True,
                     decode_times=True, decode_coords=True, lock=None, phony_dims=None):
        from xarray.backends.h5netcdf_ import H5netcdfBackendEntrypoint

        ds = H5netcdfBackendEntrypoint().open_dataset(
            filename_or_obj, drop_variables=drop_variables, mask_and_scale=mask_and_scale, decode_times=decode_times,
            decode_coords=decode_coords, lock=lock, phony_dims=phony_dims)
        return decode_dataset(ds) if decode_bits else ds

    def guess_can_open(self, filename_or_obj) -> bool:
        if not isinstance(filename_or_obj, (str, os.PathLike)):
            return False
        try:
            import h5py

            with h5py.File(filename_or_obj, "r", locking=False) as f:
                return f.attrs.get("format") == "toolkit-capture"
        except (OSError, TypeError, ValueError):
            return False
