"""Atomic operations on shared memory words, behind one small shim.

Two backends with the same interface (DESIGN.md §3):

- ``atomicshm``: the C extension (about 30 ns a call here); the default.
- ``libatomic``: ``ctypes`` calls into ``libatomic.so.1`` (``__atomic_*_8``/``_4``);
  slower, but has no compiled dependency of ours, and proves the shim is the only
  place that knows how atomics are done.

Every operation is sequentially consistent, like Xen's ``atomic_*``/``cmpxchg`` on
x86 (locked instructions). ``cmpxchg`` returns the old value, as Xen's does.
Offsets are byte offsets into the buffer; 64-bit words must be 8-aligned.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

BACKENDS = ("atomicshm", "libatomic")


class _AtomicShm:
    name = "atomicshm"

    def __init__(self, buf):
        import atomicshm
        v = atomicshm.AtomicView(buf)
        self._view = v
        self.address = v.address
        # Bound methods, looked up once: these are on every hot path.
        self.load = v.load_u64
        self.store = v.store_u64
        self.xchg = v.exchange_u64
        self.cmpxchg = v.cas_u64
        self.fetch_add = v.fetch_add_u64
        self.fetch_sub = v.fetch_sub_u64
        self.fetch_or = v.fetch_or_u64
        self.fetch_and = v.fetch_and_u64
        self.load32 = v.load_u32
        self.store32 = v.store_u32
        self.fetch_add32 = v.fetch_add_u32

    def close(self):
        self._view.close()


_SEQ_CST = 5


def _libatomic():
    path = ctypes.util.find_library("atomic") or "libatomic.so.1"
    lib = ctypes.CDLL(path)
    u64, u32, vp, ci = ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_int
    sig = {
        "__atomic_load_8": (u64, [vp, ci]), "__atomic_store_8": (None, [vp, u64, ci]),
        "__atomic_exchange_8": (u64, [vp, u64, ci]),
        "__atomic_compare_exchange_8": (ctypes.c_bool, [vp, vp, u64, ci, ci]),
        "__atomic_fetch_add_8": (u64, [vp, u64, ci]), "__atomic_fetch_sub_8": (u64, [vp, u64, ci]),
        "__atomic_fetch_or_8": (u64, [vp, u64, ci]), "__atomic_fetch_and_8": (u64, [vp, u64, ci]),
        "__atomic_load_4": (u32, [vp, ci]), "__atomic_store_4": (None, [vp, u32, ci]),
        "__atomic_fetch_add_4": (u32, [vp, u32, ci]),
    }
    for name, (res, args) in sig.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


class _LibAtomic:
    name = "libatomic"

    def __init__(self, buf):
        self._buf = buf
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        lib = _libatomic()
        a = self.address
        M = (1 << 64) - 1
        exp = ctypes.c_uint64()
        pexp = ctypes.byref(exp)
        # getattr: inside a class body, ``lib.__atomic_x`` would be name-mangled.
        f = {n: getattr(lib, f"__atomic_{n}") for n in (
            "load_8", "store_8", "exchange_8", "compare_exchange_8", "fetch_add_8",
            "fetch_sub_8", "fetch_or_8", "fetch_and_8", "load_4", "store_4", "fetch_add_4")}
        ld, st, xc = f["load_8"], f["store_8"], f["exchange_8"]
        ce, fa, fs = f["compare_exchange_8"], f["fetch_add_8"], f["fetch_sub_8"]
        fo, fn_, l4 = f["fetch_or_8"], f["fetch_and_8"], f["load_4"]
        s4, fa4 = f["store_4"], f["fetch_add_4"]

        def cmpxchg(off, old, new):
            exp.value = old
            ce(a + off, pexp, new & M, _SEQ_CST, _SEQ_CST)
            return exp.value  # on failure libatomic stores the current value here
        self.load = lambda off: ld(a + off, _SEQ_CST)
        self.store = lambda off, v: st(a + off, v & M, _SEQ_CST)
        self.xchg = lambda off, v: xc(a + off, v & M, _SEQ_CST)
        self.cmpxchg = cmpxchg
        self.fetch_add = lambda off, v: fa(a + off, v & M, _SEQ_CST)
        self.fetch_sub = lambda off, v: fs(a + off, v & M, _SEQ_CST)
        self.fetch_or = lambda off, v: fo(a + off, v & M, _SEQ_CST)
        self.fetch_and = lambda off, v: fn_(a + off, v & M, _SEQ_CST)
        self.load32 = lambda off: l4(a + off, _SEQ_CST)
        self.store32 = lambda off, v: s4(a + off, v & 0xFFFFFFFF, _SEQ_CST)
        self.fetch_add32 = lambda off, v: fa4(a + off, v & 0xFFFFFFFF, _SEQ_CST)

    def close(self):
        pass


def atomics(buf, backend: str | None = None):
    """Return an atomics object over ``buf`` (an mmap or other writable buffer).

    ``backend`` defaults to ``$EMU_ATOMIC_BACKEND`` or ``atomicshm``.
    """
    backend = backend or os.environ.get("EMU_ATOMIC_BACKEND") or "atomicshm"
    if backend == "atomicshm":
        return _AtomicShm(buf)
    if backend == "libatomic":
        return _LibAtomic(buf)
    from emu.errors import UsageError
    raise UsageError("atomic backend",
                     f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")


def signed(v: int) -> int:
    """A 64-bit word read back as a signed value (e.g. ``severity_cpu`` = -1)."""
    return v - (1 << 64) if v & (1 << 63) else v
