"""Asynchronous checks of the inputs of every op on GPU arrays (targets, class
weights, probability targets, top-k teachers), and :func:`synchronize`.

No call waits for the GPU: each call's checking kernel writes a few numbers
(the cross-entropy's ``validate``: eleven, see ``fastloss.cuda.cross_entropy``;
the soft-target ``finish``: seven; distillation: ``validate``'s eleven and
the top-k check's nine), an asynchronous copy takes them to pinned host
memory, and :class:`Checks` raises the contract's ``ValueError`` once they
have landed, from that call, a later one, or :func:`synchronize`. Each call
hands over the function that words its numbers (:func:`check_message` for
class-index targets). When they flag an error the loss kernels write a NaN
loss and nothing else.
"""

import threading

import numpy as np

from .. import _validate as V
from .. import config

__all__ = ["CHECKS", "Checks", "check_message", "event_done", "synchronize"]


class Checks:
    """The checking kernels' numbers on their way to the host without a wait:
    one queue for every op.

    Each call queues a copy of its numbers (at most :attr:`WIDTH`) into a slot
    of a pinned host ring, and an event after it, on its stream, with the
    function that words them; then it polls every pending slot whose event
    has completed (no waiting) and raises the contract's ``ValueError`` for
    the first one flagged. A flagged call's kernels only wrote a NaN loss
    (and, for probability targets, an unspecified gradient; see
    ``fastloss.cuda.soft_cross_entropy_host``). On a GPU the flagged call has
    usually not finished when it returns, so its error comes from the next
    fastloss call, or from :func:`fastloss.cuda.synchronize`; the simulator runs
    synchronously, so there it comes from the call itself, as it does on a
    GPU with ``config.CUDA_SYNC_CHECKS = True`` (each call waits)."""

    SLOTS = 64
    WIDTH = 20  # the widest op's numbers: distillation (11 + 9)

    def __init__(self):
        self.ring = None
        self.free = []
        self.pending = []  # [call id, event, slot, message, info], oldest first
        self.calls = 0
        self.errors = []  # settled, not yet raised
        self.lock = threading.RLock()  # calls from several Python threads

    def submit(self, gpu, stats, info, message=None):
        """Queue the copy of ``stats`` (a float64 device vector of at most
        :attr:`WIDTH` numbers); returns the call's id. ``message(h, info)``
        words the error of the landed numbers ``h`` (None: no error; default
        :func:`check_message`); ``info``: what it needs besides them."""
        with self.lock:
            return self._submit(gpu, stats, info, message or check_message)

    def _submit(self, gpu, stats, info, message):
        cuda = gpu.cuda
        if self.ring is None:
            self.ring = _pinned(gpu, (self.SLOTS, self.WIDTH))
            self.free = list(range(self.SLOTS))
        self.calls += 1
        if not self.free:  # every slot in flight: wait for the oldest
            self._poll(self.calls, wait_for=1)
        slot = self.free.pop()
        width = stats.shape[0]
        if width > self.WIDTH:
            raise RuntimeError(f"fastloss: {width} check numbers do not fit a slot of {self.WIDTH}")
        stats.copy_to_host(self.ring[slot, :width], stream=gpu.stream)
        event = cuda.event() if gpu.sim else cuda.event(timing=False)
        event.record(gpu.stream)
        self.pending.append([self.calls, event, slot, message, info])
        return self.calls

    def poll(self, current=None, wait_for=0):
        """Settle the pending checks that have landed (waiting for the oldest
        ``wait_for`` of them, or for all with ``config.CUDA_SYNC_CHECKS``) and
        raise the first error found (now or while making room in the ring)."""
        with self.lock:
            self._poll(current, wait_for)
            errors, self.errors = self.errors, []
        if errors:
            more = f" [and {len(errors) - 1} more flagged call(s)]" if len(errors) > 1 else ""
            raise ValueError(errors[0] + more)

    def _poll(self, current, wait_for):
        """Settle what has landed; errors go to ``self.errors``."""
        wait_all = bool(config.CUDA_SYNC_CHECKS)
        keep = []
        for k, entry in enumerate(self.pending):
            call, event, slot, message, info = entry
            if wait_all or k < wait_for:
                event.synchronize()
            elif not event_done(event):
                keep.append(entry)
                continue
            msg = message(self.ring[slot], info)
            self.free.append(slot)
            if msg is not None:
                if call != current:
                    msg += " (an earlier GPU call; errors are checked without waiting, see fastloss.cuda.synchronize)"
                self.errors.append(msg)
        self.pending = keep

    def synchronize(self):
        """Wait for every pending check and raise the first error."""
        self.poll(wait_for=len(self.pending))


#: The checks of this process's calls (tests replace it).
CHECKS = Checks()


def _pinned(gpu, shape):
    """A float64 host array in page-locked memory that every CUDA context sees
    as pinned (so copies into it from any GPU stay asynchronous)."""
    cuda = gpu.cuda
    if not gpu.sim:
        try:
            nbytes = int(np.prod(shape)) * 8
            buf = cuda.current_context().memhostalloc(nbytes, portable=True)
            return np.ndarray(shape=shape, dtype=np.float64, buffer=buf)
        except Exception:  # numba-cuda internals differ: pinned for this context only
            pass
    return cuda.pinned_array(shape, np.float64)


def event_done(event):
    """Whether a recorded event has completed (without waiting)."""
    query = getattr(event, "query", None)  # the simulator's events have none: all done
    return True if query is None else bool(query())


def check_message(h, info):
    """The contract's error message for one call's ``validate`` numbers ``h``
    (bad targets, bad class weights), or None. ``info``: ``(targets shape, V,
    ignore_index, accumulation dtype, has class weights, targets are uint64)``."""
    tshape, nclass, ignore_index, acc, has_w, t_u64 = info
    nbad = int(h[0])
    if nbad:
        first = int(h[1])
        value = (int(h[9]) << 32) | int(h[10])
        if t_u64 and value < 0:
            value += 1 << 64
        return str(V.bad_targets_error(nbad, nclass, ignore_index, tshape, first, value))
    if h[3]:
        return str(V.nonfinite_weight_error())
    if has_w and h[7] < 0:
        return str(V.negative_weight_error(acc.type(h[7])))
    return None


def synchronize():
    """Wait for the GPU work of every fastloss call and raise a pending error.

    Calls on GPU arrays never wait for the GPU; their checks of the targets,
    class weights and teachers land later (see :class:`Checks`). This
    waits for them all and raises the contract's ``ValueError`` for the first
    bad call, if any. ``config.CUDA_SYNC_CHECKS = True`` makes every call wait
    instead."""
    CHECKS.synchronize()
