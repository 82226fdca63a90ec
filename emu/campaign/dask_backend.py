"""The Dask backend: ``--dask local`` or ``--dask tcp://host:port``.

Each Dask worker keeps one booted machine (in the worker process, built on its first
task and reused by every later task with the same campaign options) and runs
*blocks* of trial indices: task ``k`` plays the ``k``-th block of ``block``
consecutive indices of the shard's sequence, and returns its records. Trial ``i`` is
rebuilt from ``(seed, i)`` alone, so it gets the same scenario, perturbation seed and
fault on any worker. A block ends with a Dom0 drain and the exactly-once check of
the records it committed without waiting (:meth:`Worker.finish`).

``local`` starts a ``distributed.LocalCluster`` of ``jobs`` worker processes, one
thread each (a machine's front end is not thread-safe); an address connects to a
running scheduler whose workers have emu installed (started with one thread each:
``dask worker --nthreads 1``). A worker keeps the machine of the last campaign it
served; a campaign with other options replaces it. The machine of a worker ends
with the worker process (its processes have a parent-death signal, its memory has
no name in ``/dev/shm``). Needs the ``dask`` extra (``distributed``).
"""
from __future__ import annotations

import atexit
import threading
import time

_WORKERS: dict = {}   # in a Dask worker process: options key -> Worker
_LOCK = threading.Lock()   # a worker with several threads still runs one block at a time


def _key(opts) -> str:
    return repr((opts.config, opts.mix_text, opts.chaos, opts.starve, opts.faults,
                 opts.fault_rate, opts.hazard_c, sorted(opts.hooks.items())))


def _close_all() -> None:
    for w in list(_WORKERS.values()):
        try:
            w.close()
        except Exception:  # noqa: BLE001 - the process is ending anyway
            pass
    _WORKERS.clear()


def run_block(opts, items: list) -> dict:
    """In a Dask worker: play ``items`` (``("trial", i)`` or ``("db", entry)``) on this
    process's machine; ``{"records": [...], "finish": [...], "pid": ...}``."""
    with _LOCK:
        return _run_block(opts, items)


def _run_block(opts, items: list) -> dict:
    import os

    from emu.campaign.stress import Worker, play_items
    k = _key(opts)
    w = _WORKERS.get(k)
    if w is None:
        if not _WORKERS:
            atexit.register(_close_all)
        _close_all()                  # one machine per worker: another campaign's goes
        w = _WORKERS[k] = Worker(opts).start()
    before = w.warm_resets
    recs: list = []
    play_items(w, opts, items, recs.append)
    for r in recs:
        r["worker"] = os.getpid()
    return {"records": recs, "finish": w.finish(), "warm_resets": w.warm_resets - before,
            "pid": os.getpid()}


def _blocks(campaign):
    """Blocks of items: the failure database's first, then the trial indices."""
    from emu.campaign.shards import indices
    o = campaign.o
    db = campaign.db_items()
    if db:
        yield db
    block = []
    for i in indices(o.shard, 0, 1, o.trials):
        block.append(("trial", i))
        if len(block) == o.block:
            yield block
            block = []
    if block:
        yield block


def run_dask(campaign, deadline) -> None:
    """Run the campaign's blocks on Dask workers, handing records to the campaign in
    the order blocks finish (at most ``2 x workers`` blocks in flight)."""
    from distributed import Client, LocalCluster, as_completed
    o = campaign.o
    cluster = None
    if o.dask == "local":
        cluster = LocalCluster(n_workers=o.jobs, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=40)
        client = Client(cluster)
    else:
        client = Client(o.dask, timeout=30)
    try:
        nworkers = max(1, len(client.scheduler_info()["workers"]))
        gen = _blocks(campaign)
        ac = as_completed()
        inflight = 0

        def submit() -> bool:
            nonlocal inflight
            if campaign.stop or (deadline is not None and time.monotonic() >= deadline):
                return False
            b = next(gen, None)
            if b is None:
                return False
            ac.add(client.submit(run_block, o, b, pure=False))
            inflight += 1
            return True
        for _ in range(2 * nworkers):
            if not submit():
                break
        for fut in ac:
            inflight -= 1
            res = fut.result()
            for r in res["records"]:
                campaign.handle(r)
            campaign.handle({"finish": res["finish"], "warm_resets": res["warm_resets"]})
            submit()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
