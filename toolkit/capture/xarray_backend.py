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
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Literal

import numpy as np
from xarray.backends import BackendEntrypoint

from toolkit.capture.store import FORMAT_NAME, check_format, check_format_version
from toolkit.errors import ToolkitError

if TYPE_CHECKING:
    import numpy.typing as npt
    import xarray as xr
    from xarray.backends.common import T_PathFileOrDataStore
    from xarray.coders import CFDatetimeCoder
    from xarray.core.types import Lock

DECODED_LOGICAL = ("bfloat16", "float16")


def bf16_bits_to_float32(bits: npt.ArrayLike) -> np.ndarray:
    """Raw bf16 bit patterns (uint16 / int16) -> float32 (``float32 bits = uint32(x) << 16``), exactly as torch widens
    bf16."""
    bits = np.asarray(bits)
    return (bits.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _float16_to_float32(x) -> np.ndarray:
    return np.asarray(x).astype(np.float32)


def decode_variable(var: xr.Variable) -> xr.Variable:
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


def decode_dataset(ds: xr.Dataset) -> xr.Dataset:
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

    def open_dataset(
        self,
        filename_or_obj: T_PathFileOrDataStore,
        *,
        drop_variables: str | Iterable[str] | None = None,
        decode_bits: bool = True,
        mask_and_scale: bool | Mapping[str, bool] = True,
        decode_times: bool | CFDatetimeCoder | Mapping[str, bool | CFDatetimeCoder] = True,
        decode_coords: Literal["coordinates", "all"] | bool = True,
        lock: Lock | Literal[False] | None = None,
        phony_dims: Literal["sort", "access"] | None = None,
    ) -> xr.Dataset:
        from xarray.backends.h5netcdf_ import H5netcdfBackendEntrypoint

        ds = H5netcdfBackendEntrypoint().open_dataset(
            filename_or_obj, drop_variables=drop_variables, mask_and_scale=mask_and_scale, decode_times=decode_times,
            decode_coords=decode_coords, lock=lock, phony_dims=phony_dims)
        try:  # refused as open_capture refuses it
            check_format(ds.attrs.get("format"), filename_or_obj)
            try:
                version = int(ds.attrs.get("format_version"))
            except (TypeError, ValueError):
                raise ToolkitError(f"{filename_or_obj}: damaged capture file: format_version "
                                   f"{ds.attrs.get('format_version')!r}") from None
            check_format_version(version, filename_or_obj)
        except ToolkitError:
            ds.close()
            raise
        return decode_dataset(ds) if decode_bits else ds

    def guess_can_open(self, filename_or_obj: T_PathFileOrDataStore) -> bool:
        if not isinstance(filename_or_obj, (str, os.PathLike)):
            return False
        try:
            import h5py

            with h5py.File(filename_or_obj, "r", locking=False) as f:
                return f.attrs.get("format") == FORMAT_NAME
        except (OSError, TypeError, ValueError):
            return False
