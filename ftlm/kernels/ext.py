"""Loads the native extension ftlm._C once; if it is missing, warns once and lets callers fall back.

Build it with `pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`).
"""

import warnings

_UNSET = object()
_module = _UNSET
_warned_devices = set()


def extension():
    """The ftlm._C module, or None when it cannot be imported (warned about once)."""
    global _module
    if _module is _UNSET:
        try:
            from ftlm import _C

            _module = _C
        except ImportError as e:
            _module = None
            warnings.warn(
                f"ftlm._C could not be imported ({e}); cross-entropy falls back to the slower, more "
                "memory-hungry PyTorch version. Build the extension with "
                "`pip install --no-build-isolation -e .`.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _module


def has_extension():
    return extension() is not None


def supports(device):
    """Whether the extension can run on `device`; warns once per device type when it cannot."""
    ext = extension()
    if ext is None:
        return False
    if device.type == "cpu" or (device.type == "cuda" and ext.has_cuda()):
        return True
    if device.type not in _warned_devices:
        _warned_devices.add(device.type)
        hint = " rebuild it with FTLM_CUDA=1 on a machine with nvcc" if device.type == "cuda" else ""
        warnings.warn(
            f"ftlm._C has no {device.type} kernels; cross-entropy falls back to the PyTorch version.{hint}",
            RuntimeWarning,
            stacklevel=3,
        )
    return False
