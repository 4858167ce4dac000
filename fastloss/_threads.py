"""Thread count of the CPU kernels (numba's thread pool; numba is imported on
first use, not by ``import fastloss``)."""


def set_num_threads(n):
    """Use ``n`` threads for fastloss kernels launched from the calling Python thread.

    Parameters
    ----------
    n : int
        1 <= n <= ``NUMBA_NUM_THREADS`` (the pool size, fixed at start-up; set
        the environment variable ``NUMBA_NUM_THREADS`` before importing to change it).

    Raises
    ------
    ValueError
        ``n`` outside that range.

    Notes
    -----
    This is numba's ``set_num_threads``: the setting is per Python thread (new
    threads start with the full pool).

    Examples
    --------
    >>> import fastloss
    >>> fastloss.set_num_threads(1); fastloss.get_num_threads()
    1
    >>> fastloss.set_num_threads(fastloss.max_threads())
    """
    import numba

    limit = numba.config.NUMBA_NUM_THREADS
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit:
        raise ValueError(f"n: expected an integer in [1, {limit}] (NUMBA_NUM_THREADS), found {n!r}")
    numba.set_num_threads(n)


def get_num_threads():
    """Threads the next kernel launched from this Python thread will use."""
    import numba

    return numba.get_num_threads()


def max_threads():
    """Size of the thread pool (``NUMBA_NUM_THREADS``)."""
    import numba

    return numba.config.NUMBA_NUM_THREADS
