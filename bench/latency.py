#!/usr/bin/env python3
"""Handler latency benchmark: injection -> every CPU has left the #MC handler.

    python bench/latency.py [--cpus 4,16,64] [--injections 1000] [--json]

Same as ``emu bench``. Prints medians and p99 by CPU count and, measured in the
same run, the floor: the one-way futex wake-up of a sleeping process. Beside them,
injection -> the record is in Dom0's log (``dom0_logged_p50_us``/``_p99_us``, fsync'd),
and the same from a second run with Dom0's fsync off (``dom0_logged_nofsync_*``, with
that run's ``handler_exit_nofsync_*``).
"""
import argparse
import sys

from emu.bench import main

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpus", default="4,16,64")
    p.add_argument("--injections", type=int, default=1000)
    p.add_argument("--json", action="store_true")
    sys.exit(main(p.parse_args()))
