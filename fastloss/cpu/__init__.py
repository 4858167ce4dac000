"""numba CPU kernels, one module per op (``cross_entropy``, ``mse``, ``eval_metrics``),
each beside its host module (``*_host.py``: arrays checked and shaped, scratch,
launch). The kernels trust their inputs: call them only through ``fastloss.ops``
or ``fastloss.evaluation``, which validate."""
