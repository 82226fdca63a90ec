"""The machine page table and ``offline_page`` (xen/common/page_alloc.c).

Modelled: one word per machine page (MFN) in Xen memory holding the owner domain,
state bits and the guest frame number (the M2P entry). The default memory map:

====================  ====================================================
MFN range             owner
====================  ====================================================
0x000 – 0x0FF         Xen, fixed (text/data): offlining fails, -EPERM
0x100 – 0x17F         Xen heap: offline pending (PENDING | XENPAGE)
0x180 – 0x1FF         free: offlined at once (OFFLINED)
0x200 + k·0x1000 …    domain k (Dom0 first, then guests), 0x1000 pages each,
                      gfn = mfn − start
rest                  free
====================  ====================================================

``offline_page(mfn, broken=1)`` follows Xen's order of checks and status bits
(public/sysctl.h ``PG_OFFLINE_*``). Not modelled: non-RAM holes, shared
(``dom_cow``) pages, PoD.
"""
from __future__ import annotations

EINVAL, EPERM = 22, 1

PG_OFFLINE_OFFLINED = 1 << 1
PG_OFFLINE_PENDING = 1 << 2
PG_OFFLINE_FAILED = 1 << 3
PG_OFFLINE_AGAIN = 1 << 4
PG_OFFLINE_XENPAGE = 1 << 8
PG_OFFLINE_DOM0PAGE = 1 << 9
PG_OFFLINE_ANONYMOUS = 1 << 10
PG_OFFLINE_NOT_CONV_RAM = 1 << 11
PG_OFFLINE_OWNED = 1 << 12
PG_OFFLINE_BROKEN = 1 << 13
PG_OFFLINE_OWNER_SHIFT = 16

DOMID_XEN = 0x7FF2
DOMID_INVALID = 0x7FF4
DOMID_NONE = 0xFFFF     # page table: free page

# state bits (bits 16..31 of a page word)
PGC_FREE = 0            # no state bit: on the heap
PGC_ALLOCATED = 1 << 0
PGC_XEN_FIXED = 1 << 1
PGC_XEN_HEAP = 1 << 2
PGC_BROKEN = 1 << 3
PGC_OFFLINING = 1 << 4
PGC_OFFLINED = 1 << 5

XEN_FIXED = range(0x000, 0x100)
XEN_HEAP = range(0x100, 0x180)
DOM_BASE = 0x200
DOM_PAGES = 0x1000


def _pack(owner: int, state: int, gfn: int) -> int:
    return (owner & 0xFFFF) | (state & 0xFFFF) << 16 | (gfn & 0xFFFFFFFF) << 32


def unpack(word: int) -> tuple[int, int, int]:
    return word & 0xFFFF, (word >> 16) & 0xFFFF, word >> 32


class Layout:
    def __init__(self, alloc, npages: int):
        self.npages = npages
        self.lock = alloc.words(2)
        self.table = alloc.words(npages)


def domain_range(domid_index: int) -> range:
    start = DOM_BASE + domid_index * DOM_PAGES
    return range(start, start + DOM_PAGES)


class PageTable:
    """Access to the page words. Updates are compare-and-swap, so concurrent
    ``offline_page`` calls on one page give one winner, as under Xen's heap lock."""

    def __init__(self, R):
        self.X = R.X
        self.L = R.L.pages
        self.npages = self.L.npages
        self._mv = memoryview(R.xen_map)

    def _off(self, mfn: int) -> int:
        return self.L.table + 8 * mfn

    def get(self, mfn: int) -> tuple[int, int, int]:
        return unpack(self.X.load(self._off(mfn)))

    def set(self, mfn: int, owner: int, state: int, gfn: int = 0) -> None:
        self.X.store(self._off(mfn), _pack(owner, state, gfn))

    def init_default(self, domids: list[int]) -> None:
        """Lay out the default memory map for the given domains (Dom0 first).

        At boot, before any CPU runs: the table is built once per domain list as an
        image and copied in one slice (a word at a time took 39 ms of a 60 ms warm
        reset with 16384 pages; a campaign resets after every fatal trial)."""
        key = tuple(domids)
        img = self._images.get(key) if hasattr(self, "_images") else None
        if img is None:
            img = self._image(domids)
            self._images = {key: img}
        off = self.L.table
        self._mv[off:off + len(img)] = img

    def _image(self, domids: list[int]) -> bytes:
        import numpy as np
        t = np.full(self.npages, _pack(DOMID_NONE, PGC_FREE, 0), dtype="<u8")
        t[XEN_FIXED.start:min(XEN_FIXED.stop, self.npages)] = _pack(
            DOMID_XEN, PGC_XEN_FIXED | PGC_ALLOCATED, 0)
        t[XEN_HEAP.start:min(XEN_HEAP.stop, self.npages)] = _pack(
            DOMID_XEN, PGC_XEN_HEAP | PGC_ALLOCATED, 0)
        for k, d in enumerate(domids):
            r = domain_range(k)
            if r.stop > self.npages:
                break
            gfn = np.arange(len(r), dtype="<u8")
            t[r.start:r.stop] = np.uint64(_pack(d, PGC_ALLOCATED, 0)) | (gfn << np.uint64(32))
        return t.tobytes()

    def owner(self, mfn: int) -> int:
        if not 0 <= mfn < self.npages:
            return DOMID_INVALID
        o, st, _ = self.get(mfn)
        if st & PGC_ALLOCATED:
            return o
        return DOMID_INVALID

    def gfn_to_mfn(self, domid: int, gfn: int) -> int | None:
        """p2m lookup in the default map: a domain's frames are one contiguous
        range, found by its first frame; the M2P entry confirms the result."""
        for k in range(max(0, (self.npages - DOM_BASE) // DOM_PAGES)):
            r = domain_range(k)
            if self.get(r.start)[0] != domid:
                continue
            mfn = r.start + gfn
            if mfn in r and self.get(mfn)[0] == domid and self.get(mfn)[2] == gfn:
                return mfn
            return None
        return None

    def offline_page(self, mfn: int, broken: bool = True) -> tuple[int, int, int]:
        """Xen's ``offline_page``: returns (ret, status, owner-to-crash or -1)."""
        if not 0 <= mfn < self.npages:
            return -EINVAL, 0, -1
        off = self._off(mfn)
        while True:
            word = self.X.load(off)
            owner, st, gfn = unpack(word)
            if st & PGC_XEN_FIXED:
                return (-EPERM, PG_OFFLINE_XENPAGE | PG_OFFLINE_FAILED
                        | DOMID_XEN << PG_OFFLINE_OWNER_SHIFT, -1)
            brk = PG_OFFLINE_BROKEN if broken else 0
            # A page already broken and still owned: the owner touched it again.
            if st & PGC_BROKEN and st & PGC_ALLOCATED and owner != DOMID_XEN:
                return 0, PG_OFFLINE_AGAIN, owner
            new_st = st | (PGC_BROKEN if broken else 0)
            if not st & PGC_ALLOCATED or st & PGC_OFFLINED:
                new_st = (new_st | PGC_OFFLINED) & ~PGC_OFFLINING
                status = PG_OFFLINE_OFFLINED | brk
            elif st & PGC_XEN_HEAP:
                new_st |= PGC_OFFLINING
                status = (PG_OFFLINE_XENPAGE | PG_OFFLINE_PENDING
                          | DOMID_XEN << PG_OFFLINE_OWNER_SHIFT | brk)
            elif owner < DOMID_XEN:
                new_st |= PGC_OFFLINING
                status = (PG_OFFLINE_OWNED | PG_OFFLINE_PENDING
                          | owner << PG_OFFLINE_OWNER_SHIFT | brk)
            else:
                status = (PG_OFFLINE_ANONYMOUS | PG_OFFLINE_FAILED
                          | DOMID_INVALID << PG_OFFLINE_OWNER_SHIFT | brk)
            if self.X.cmpxchg(off, word, _pack(owner, new_st, gfn)) == word:
                return 0, status, -1


def offline_status_names(status: int) -> list[str]:
    names = [("OFFLINED", PG_OFFLINE_OFFLINED), ("PENDING", PG_OFFLINE_PENDING),
             ("FAILED", PG_OFFLINE_FAILED), ("AGAIN", PG_OFFLINE_AGAIN),
             ("XENPAGE", PG_OFFLINE_XENPAGE), ("ANONYMOUS", PG_OFFLINE_ANONYMOUS),
             ("OWNED", PG_OFFLINE_OWNED), ("BROKEN", PG_OFFLINE_BROKEN)]
    return [n for n, b in names if status & b]
