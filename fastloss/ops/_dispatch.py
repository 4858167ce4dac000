"""Which backend runs a call: the one lazy host-module picker every op uses."""

from importlib import import_module

import numpy as np

from ..cuda import is_device_array

__all__ = ["backend_picker"]


def backend_picker(host_module):
    """A function ``backend(x)`` returning the host module named ``host_module``
    of the backend that runs array ``x``: ``fastloss.cuda.<host_module>`` for
    GPU arrays, else ``fastloss.cpu.<host_module>``.

    Both are imported on first use (numba loads on the first call, not with
    ``import fastloss``); the CPU module is then kept, since a function-level
    import costs ~0.5 us a call and small calls are dominated by such costs.
    """
    cpu = None

    def backend(x):
        nonlocal cpu
        if type(x) is not np.ndarray and is_device_array(x):
            return import_module(".cuda." + host_module, "fastloss")
        if cpu is None:
            cpu = import_module(".cpu." + host_module, "fastloss")
        return cpu

    backend.__doc__ = (f"The host module that runs ``x``: ``fastloss.cpu.{host_module}``, or "
                       f"``fastloss.cuda.{host_module}`` for GPU arrays (imported on first use).")
    return backend
