"""The CUDA kernels as a GPU build sees them, checked on a machine without a GPU.

The simulator (``tests/test_cuda_sim.py``) runs the kernels' Python source; it
cannot tell whether numba-cuda compiles them, how many registers they take or
whether the wide accesses became 8-byte loads. Here every kernel is compiled
to PTX for sm_90 (H100/H200) by numba-cuda's NVVM, then assembled by ptxas
(both come with ``numba-cuda[cu12]``, installed by the ``test`` extra), and
the assembler's report is checked:

* it assembles (a typing or lowering error would otherwise surface only on a
  GPU machine);
* no register spills for blocks of up to 256 threads, and at most 96 bytes
  at 1024 threads (there the kernels cap registers at 64 per thread so a
  block fits the register file, as ``fastloss.cuda.cross_entropy`` does);
* the wide variants load 8-byte words (``ld.global.u64``) and the resident
  kernel uses dynamic shared memory.

The class-index cross-entropy and logsumexp, the probability-target
cross-entropy, distillation, MSE and the helper kernels are all here.

Also the launch decision for the resident kernel
(``fastloss.cuda.launch.resident_bytes``) against a fake device, and that each
kernel's argument tuple names its parameters in order. Skipped when
numba-cuda, NVVM or ptxas is missing.
"""

import os
import pathlib
import re
import subprocess

import numpy as np
import pytest

numba_cuda = pytest.importorskip("numba_cuda")

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("the simulator replaces the compiler", allow_module_level=True)


def _ptxas():
    try:
        import nvidia.cuda_nvcc
    except ImportError:
        return None
    for root in nvidia.cuda_nvcc.__path__:
        p = pathlib.Path(root) / "bin" / "ptxas"
        if p.exists():
            return str(p)
    return None


PTXAS = _ptxas()
CC = (9, 0)


class _FakeDevice:
    """What numba-cuda asks of the current device while compiling device functions."""
    compute_capability = CC
    id = 0


@pytest.fixture(scope="module")
def compiler():
    """``compile(kernel, signature, tpb) -> (ptx, ptxas report)``; numba-cuda is
    told the current device is an sm_90 (it asks while typing device
    functions); ptxas gets the kernels' register cap for big blocks."""
    if PTXAS is None:
        pytest.skip("ptxas not installed (pip install 'numba-cuda[cu12]')")
    import numba.cuda.dispatcher as D
    from numba import cuda
    mp = pytest.MonkeyPatch()
    mp.setattr(D, "get_current_device", lambda: _FakeDevice())
    try:
        cuda.compile_ptx(lambda a: None, "void(float32[::1])", cc=CC)
    except Exception as e:  # NVVM missing or unusable
        mp.undo()
        pytest.skip(f"numba-cuda cannot compile PTX here: {type(e).__name__}: {e}")

    def compile_one(kernel, sig, tpb, tmp):
        ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=CC)
        src = tmp / "k.ptx"
        src.write_text(ptx)
        cmd = [PTXAS, f"-arch=sm_{CC[0]}{CC[1]}", "-v", str(src), "-o", str(tmp / "k.cubin")]
        if tpb > 256:
            cmd.insert(2, f"-maxrregcount={max(16, min(255, 65536 // tpb) // 8 * 8)}")
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        return ptx, r.stderr

    yield compile_one
    mp.undo()


def _report(text):
    """(registers, spill store bytes, spill load bytes) from ptxas -v."""
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    st = int(re.search(r"(\d+) bytes spill stores", text).group(1))
    ld = int(re.search(r"(\d+) bytes spill loads", text).group(1))
    return regs, st, ld


def _scalar_types(acc):
    """The numba types of the kernels' scalar tuples, as the host side builds them."""
    import numba

    from fastloss.cuda.cross_entropy import CEScalars, GradScalars, LogitScalars
    from fastloss.cuda.mse import MSEScalars
    a = np.float64 if acc == "float64" else np.float32
    tr = numba.typeof(LogitScalars(a(1), a(1), a(1)))
    sc = numba.typeof(CEScalars(np.int64(3), np.int64(-100), True, True, 0.1, 0.01, 2))
    up = numba.typeof(GradScalars(0, 1.0))
    ms = numba.typeof(MSEScalars(1, np.int64(1), 2, 1.0, False, True))
    return tr, sc, up, ms


def _ce_signatures(acc, kind, per):
    """Argument types of (forward, fused/fused_resident, lse) as the host side passes them
    (``ForwardArgs``, ``FusedArgs``, ``LseArgs`` of ``fastloss.cuda.cross_entropy``)."""
    from numba import types

    from fastloss import codes
    ACC = types.float64 if acc == "float64" else types.float32
    E = types.uint16 if kind != codes.NATIVE else ACC
    W = types.uint64 if per > 1 else E
    tr, sc, up, _ = _scalar_types(acc)

    def A(dt, nd=1):
        return types.Array(dt, nd, "C")
    head = (A(W), A(E), A(types.int64), A(ACC), A(types.float64), tr, sc)  # logits, tgt, w, stats
    tail = (A(ACC), A(ACC), A(types.int32), A(types.float64, 2))  # loss, out, counter, partial
    forward = head + tail
    fused = head + (up, A(types.float64), A(W), A(E)) + tail + (types.uint64,)
    lse = (A(W), A(E), types.int64, A(ACC), tr, A(ACC))
    return forward, fused, lse


def _ce_cases():
    from fastloss.codes import BF16, F16, NATIVE, PLAIN, SCALED, SOFTCAP
    quick = [("float32", BF16, 4, PLAIN, 256), ("float32", NATIVE, 2, PLAIN, 1024)]
    slow = [("float32", BF16, 4, SOFTCAP, 1024), ("float32", F16, 4, SCALED, 256),
            ("float32", NATIVE, 2, SOFTCAP, 256), ("float32", BF16, 1, PLAIN, 256),
            ("float64", NATIVE, 1, PLAIN, 256)]
    return ([pytest.param(*c, id="-".join(map(str, c))) for c in quick]
            + [pytest.param(*c, id="-".join(map(str, c)), marks=pytest.mark.slow) for c in slow])


@pytest.mark.parametrize("acc, kind, per, mode, tpb", _ce_cases())
def test_cross_entropy_kernels_assemble_without_spills(compiler, tmp_path, acc, kind, per, mode, tpb):
    from fastloss.cuda.cross_entropy import ce_kernels
    forward, fused, lse, resident = ce_kernels(acc, kind, mode, tpb, per)
    sig_f, sig_g, sig_l = _ce_signatures(acc, kind, per)
    spill_limit = 0 if tpb <= 256 else 96  # 1024 threads: 64 registers; measured 48-68 bytes
    for name, kernel, sig in (("forward", forward, sig_f), ("fused", fused, sig_g),
                              ("lse", lse, sig_l), ("fused_resident", resident, sig_g)):
        ptx, report = compiler(kernel, sig, tpb, tmp_path)
        regs, st, ld = _report(report)
        assert st <= spill_limit and ld <= spill_limit, f"{name}: {report}"
        if tpb > 256:
            assert regs <= 65536 // tpb, f"{name}: {regs} registers, a block of {tpb} does not fit"
        static = int(re.search(r"(\d+) bytes smem", report).group(1))
        # one entry per warp: 3 softmax arrays, a float64 one and the last-block flag
        assert static <= 4 * 32 * 8 + 16, f"{name}: {static} bytes of static shared memory"
        wide_loads = len(re.findall(r"ld\.global(\.nc)?\.(u64|b64)", ptx))
        if per > 1:  # the batched loop: 4 words in flight (forward, lse, both fused)
            assert wide_loads >= 4, f"{name}: {wide_loads} 8-byte global loads"
        if name == "fused_resident":
            assert re.search(r"\.extern \.shared", ptx), "no dynamic shared memory"
            assert re.search(r"st\.shared\.(u64|b64|f32|f64|u16|b16)", ptx)


@pytest.mark.slow
def test_validate_and_mse_kernels_assemble(compiler, tmp_path):
    from numba import types

    from fastloss import codes
    from fastloss.cuda.convert import convert_kernel, copy2d_kernel
    from fastloss.cuda.cross_entropy import validate_kernel
    from fastloss.cuda.mse import mse_kernels

    def A(dt, nd=1, layout="C"):
        return types.Array(dt, nd, layout)
    f32, f64, i64 = types.float32, types.float64, types.int64
    _, sc, up, ms = _scalar_types("float32")
    validate = validate_kernel(256)
    mse, weight_sum, fin = mse_kernels("float32", codes.BF16, codes.NATIVE, 256)
    cases = [
        (validate, (A(i64), A(f32), sc, f64, A(f64))),
        (convert_kernel(codes.BF16, 256), (A(types.uint16), A(f32))),
        (copy2d_kernel(256), (A(types.uint16, 2, "A"), A(types.uint16, 2))),
        (mse, (A(types.uint16), A(f32), A(f32), ms, A(f64), up, A(f64), A(types.uint16), A(f32),
               A(f64))),
        (weight_sum, (A(f32), f64, A(f64))),
        (fin, (A(f64), ms, A(f64), A(f32))),
    ]
    for kernel, sig in cases:
        _, report = compiler(kernel, sig, 256, tmp_path)
        _, st, ld = _report(report)
        assert st == 0 and ld == 0, report


def _arr(dt, nd=1):
    from numba import types
    return types.Array(dt, nd, "C")


def _storage(acc, kind):
    """(accumulation type, element type) as the kernels see them: half
    precision arrives as uint16 bits."""
    from numba import types

    from fastloss import codes
    ACC = types.float64 if acc == "float64" else types.float32
    return ACC, types.uint16 if kind != codes.NATIVE else ACC


def _soft_cases():
    from fastloss.codes import BF16, F16, NATIVE, PLAIN, SCALED, SOFTCAP
    quick = [("float32", BF16, NATIVE, PLAIN, 256)]
    slow = [("float32", NATIVE, BF16, SOFTCAP, 256), ("float32", F16, F16, SCALED, 256),
            ("float64", NATIVE, NATIVE, PLAIN, 256)]
    return ([pytest.param(*c, id="-".join(map(str, c))) for c in quick]
            + [pytest.param(*c, id="-".join(map(str, c)), marks=pytest.mark.slow) for c in slow])


@pytest.mark.parametrize("acc, kind, qkind, mode, tpb", _soft_cases())
def test_soft_target_kernels_assemble_without_spills(compiler, tmp_path, acc, kind, qkind, mode, tpb):
    """The probability-target row kernels (forward, fused) and ``finish``, with
    the argument types the host side passes (``RowsArgs``, ``FinishArgs``)."""
    import numba
    from numba import types

    from fastloss.cuda.soft_cross_entropy import FinishArgs, RowsArgs, SoftScalars, finish_kernel, soft_kernels
    tr, _, up, _ = _scalar_types(acc)
    sc = numba.typeof(SoftScalars(np.int64(3), True, 0.9, 0.01, 0.0, 2, 3.0))
    ACC, E = _storage(acc, kind)
    _, Q = _storage(acc, qkind)
    f64 = types.float64
    forward, fused = soft_kernels(acc, kind, qkind, mode, tpb)

    def rows_sig(og):
        return tuple(RowsArgs(x=_arr(E), q=_arr(Q), w=_arr(ACC), tr=tr, sc=sc, up=up, gvec=_arr(f64), og=og,
                              loss=_arr(ACC), lse=_arr(ACC), qsum=_arr(ACC)))
    finish_sig = tuple(FinishArgs(loss=_arr(ACC), lse=_arr(ACC), qsum=_arr(ACC), q=_arr(Q), w=_arr(ACC), sc=sc,
                                  tol=f64, out=_arr(ACC), stats=_arr(f64)))
    for name, kernel, sig in (("forward", forward, rows_sig(_arr(types.float32))),  # the host's placeholder
                              ("fused", fused, rows_sig(_arr(E))),
                              ("finish", finish_kernel(qkind, tpb), finish_sig)):
        _, report = compiler(kernel, sig, tpb, tmp_path)
        _, st, ld = _report(report)
        assert st == 0 and ld == 0, f"{name}: {report}"


def _distill_cases():
    from fastloss.codes import BF16, F16, NATIVE
    quick = [("float32", BF16, BF16, "jsd", True, True, True),
             ("float32", NATIVE, NATIVE, "kl", False, False, True)]
    slow = [("float32", F16, NATIVE, "reverse_kl", False, True, False),
            ("float64", NATIVE, NATIVE, "jsd", False, True, True),
            ("float32", NATIVE, NATIVE, "kl", True, False, True)]
    return ([pytest.param(*c, id="-".join(map(str, c))) for c in quick]
            + [pytest.param(*c, id="-".join(map(str, c)), marks=pytest.mark.slow) for c in slow])


@pytest.mark.parametrize("acc, skind, tkind, kind, topk, hard, grad", _distill_cases())
def test_distill_kernels_assemble_without_spills(compiler, tmp_path, acc, skind, tkind, kind, topk, hard,
                                                 grad):
    """The distillation row kernel, ``finalize`` and the top-k check, with the
    argument types the host side passes (``DistillArgs``, ``FinalizeArgs``)."""
    import numba
    from numba import types

    from fastloss.cuda.distill import (KIND_CODES, DistillArgs, DistillScalars, FinalizeArgs, GradScalars,
                                       distill_kernels, topk_check_kernel)
    a = np.float64 if acc == "float64" else np.float32
    ACC, E = _storage(acc, skind)
    _, TE = _storage(acc, tkind)
    sc = numba.typeof(DistillScalars(np.int64(3), np.int64(1), np.int64(-100), True, True, a(1), a(0.5),
                                     1.0, 0.0, 0.0, 2, -1.0, 1.0))
    up = numba.typeof(GradScalars(0, 1.0))
    f64, i64 = types.float64, types.int64
    row_sig = DistillArgs(xe=_arr(E), te=_arr(TE), tidx=_arr(i64), tgt=_arr(i64), stats=_arr(f64), sc=sc, up=up,
                          gvec=_arr(f64), oe=_arr(E), loss=_arr(ACC), partial=_arr(f64),
                          topk_scratch=_arr(ACC, 2))
    rows, finalize = distill_kernels(acc, skind, tkind, KIND_CODES[kind], topk, hard, 256, grad)
    for name, kernel, sig in (
            ("rows", rows, tuple(row_sig)),
            ("finalize", finalize, tuple(FinalizeArgs(_arr(f64), _arr(f64), sc, _arr(ACC)))),
            ("topk_check", topk_check_kernel(tkind, 256),
             (_arr(i64), _arr(TE), _arr(i64), sc, types.boolean, _arr(f64)))):
        _, report = compiler(kernel, sig, 256, tmp_path)
        _, st, ld = _report(report)
        assert st == 0 and ld == 0, f"{name}: {report}"


def test_argument_tuples_name_the_kernel_parameters():
    """The host side builds each launch's arguments by name (``ForwardArgs``,
    ...); their fields must be the kernel's parameters, in order."""
    import inspect

    from fastloss import codes
    from fastloss.cuda.cross_entropy import (
        ForwardArgs,
        FusedArgs,
        LseArgs,
        ValidateArgs,
        ce_kernels,
        validate_kernel,
    )
    from fastloss.cuda.distill import KIND_CODES, DistillArgs, distill_kernels
    from fastloss.cuda.distill import FinalizeArgs as DistillFinalizeArgs
    from fastloss.cuda.mse import FinalizeArgs, MSEArgs, mse_kernels
    from fastloss.cuda.soft_cross_entropy import FinishArgs, RowsArgs, finish_kernel, soft_kernels
    forward, fused, lse, resident = ce_kernels("float32", codes.BF16, codes.SOFTCAP, 64, 4)
    mse, _, finalize = mse_kernels("float32", codes.F16, codes.NATIVE, 64)
    soft_forward, soft_fused = soft_kernels("float32", codes.BF16, codes.NATIVE, codes.PLAIN, 64)
    rows, distill_finalize = distill_kernels("float32", codes.NATIVE, codes.NATIVE, KIND_CODES["kl"], False,
                                             False, 8, True)
    for kernel, args in ((forward, ForwardArgs), (fused, FusedArgs), (resident, FusedArgs),
                         (lse, LseArgs), (validate_kernel(64), ValidateArgs), (mse, MSEArgs),
                         (finalize, FinalizeArgs), (soft_forward, RowsArgs), (soft_fused, RowsArgs),
                         (finish_kernel(codes.NATIVE, 64), FinishArgs), (rows, DistillArgs),
                         (distill_finalize, DistillFinalizeArgs)):
        assert tuple(inspect.signature(kernel.py_func).parameters) == args._fields


# --- the resident kernel's launch decision, against a fake device ----------------------

class _FakeCufunc:
    class attrs:
        shared = 3072
    handle = object()
    kernel = object()


class _FakeKernel:
    def typeof_pyval(self, v):
        return type(v)

    def compile(self, sig):
        class Compiled:
            class _codelibrary:
                @staticmethod
                def get_cufunc():
                    return _FakeCufunc()
        return Compiled()


class _Words:
    """The logits' word view (only its item size and layout are read)."""
    dtype = np.dtype(np.uint64)

    def is_c_contiguous(self):
        return True


class _FakeGpu:
    sim = False

    class cuda:
        @staticmethod
        def current_context():
            class Ctx:
                class device:
                    id = 7
                    MAX_SHARED_MEMORY_PER_MULTIPROCESSOR = 233472
                    MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 232448
            return Ctx


@pytest.fixture
def fake_driver(monkeypatch):
    """The driver's attribute setter, recorded (or failing)."""
    from numba.cuda.cudadrv import driver as drv
    calls = []

    class Driver:
        fail = False

        def cuKernelSetAttribute(self, attr, value, handle, dev):
            if self.fail:
                raise RuntimeError("no such attribute")
            calls.append((int(attr), value, dev))
    d = Driver()
    monkeypatch.setattr(drv, "driver", d)
    from fastloss.cuda import launch
    monkeypatch.setattr(launch, "SMEM_ALLOWED", {})
    return d, calls


def test_resident_kernel_opts_in_to_large_shared_memory(fake_driver, monkeypatch):
    import fastloss.config
    from fastloss.cuda import launch
    drv, calls = fake_driver
    k, gpu = _FakeKernel(), _FakeGpu()
    # float32 rows of 32000 classes: 16000 words of 8 bytes
    smem, per_sm = launch.resident_bytes(gpu, k, (_Words(), 2.0), 128000, 1024)
    assert smem == 128000 and per_sm == 1  # one such block per SM
    assert calls == [(8, 232448 - 3072, 7)]  # MAX_DYNAMIC_SHARED_SIZE_BYTES, once per kernel
    assert launch.resident_bytes(gpu, k, (_Words(), 2.0), 64000, 1024) == (64000, 2)
    assert launch.resident_bytes(gpu, k, (_Words(), 2.0), 20000, 256) == (20000, 8)  # by threads
    assert len(calls) == 1
    # rows larger than a block may hold: the prefix that fits, when it is at
    # least a quarter of the row (bfloat16 x 128256: 90%, float32: 45%), else
    # the streaming kernel unless resident is forced
    room = 232448 - 3072
    assert launch.resident_bytes(gpu, k, (_Words(), 2.0), 256512, 1024) == (room, 1)
    assert launch.resident_bytes(gpu, k, (_Words(), 2.0), 513024, 1024) == (room, 1)
    assert launch.resident_bytes(gpu, k, (_Words(), 2.0), 4 * room + 8, 1024) == (0, None)
    monkeypatch.setattr(fastloss.config, "CUDA_FUSED_STRATEGY", "resident")
    assert launch.resident_bytes(gpu, k, (_Words(), 2.0), 4 * room + 8, 1024) == (room, 1)
    monkeypatch.setattr(fastloss.config, "CUDA_RESIDENT_MAX_BYTES", 1001)
    assert launch.resident_bytes(gpu, k, (_Words(), 2.0), 513024, 256) == (1000, 8)  # whole words
    monkeypatch.setattr(fastloss.config, "CUDA_FUSED_STRATEGY", "stream")
    assert launch.resident_bytes(gpu, k, (_Words(), 2.0), 1000, 1024) == (0, None)


def test_resident_kernel_without_opt_in_stays_within_48k(fake_driver):
    from fastloss.cuda import launch
    drv, calls = fake_driver
    drv.fail = True
    k, gpu = _FakeKernel(), _FakeGpu()
    assert launch.resident_bytes(gpu, k, (_Words(),), 4 * 46080 + 8, 1024) == (0, None)
    assert "opt-in failed" in launch.RESIDENT_NOTE
    smem, _ = launch.resident_bytes(gpu, k, (_Words(),), 48 * 1024 - 3072, 1024)
    assert smem == 48 * 1024 - 3072


def test_row_span_tiles_the_buffer():
    """The kernels' split of each row into 8-byte words and edge elements
    (``row_span``, run here as Python): over consecutive rows the words and
    the edge elements cover every element exactly once, edges are shorter
    than a word, and a word never holds elements of two rows."""
    from fastloss.cuda.rows import make_row_span
    for per in (1, 2, 4):
        span = make_row_span(per)
        for nclass in (1, 2, 3, 5, 7, 8, 29, 50257, 128256):
            rows = 6
            seen = np.zeros(rows * nclass, np.int64)
            for i in range(rows):
                base, w0, w1, hend, tstart, end = (int(v) for v in span(i, nclass))
                assert (base, end) == (i * nclass, (i + 1) * nclass)
                assert w0 <= w1 and base <= hend <= end and hend <= tstart <= end
                assert hend - base < per and end - tstart < per
                if w1 > w0:
                    assert w0 * per >= base and w1 * per <= end  # words inside the row
                    seen[w0 * per:w1 * per] += 1
                seen[base:hend] += 1
                seen[tstart:end] += 1
            assert (seen == 1).all(), (per, nclass)


def test_resident_launch_refused_falls_back_to_48k(fake_driver):
    """If the driver refuses a launch's shared memory after all, that kernel is
    held to the default 48 KiB from then on (and the note says why)."""
    from fastloss.cuda import launch
    k, gpu = _FakeKernel(), _FakeGpu()
    args = (_Words(), 2.0)
    assert launch.resident_bytes(gpu, k, args, 128000, 1024) == (128000, 1)
    launch.resident_refused(gpu, k, args, RuntimeError("CUDA_ERROR_INVALID_VALUE"))
    assert "resident launch failed" in launch.RESIDENT_NOTE
    # 48 KiB less the static 3 KiB: 35% of the row, above the quarter: kept
    assert launch.resident_bytes(gpu, k, args, 128000, 1024) == (48 * 1024 - 3072, 2)
    assert launch.resident_bytes(gpu, k, args, 4 * 48 * 1024, 1024) == (0, None)
