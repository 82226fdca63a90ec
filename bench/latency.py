#!/usr/bin/env python3
"""Handler latency benchmark: the same as ``emu bench`` (see :mod:`emu.bench`).

    python bench/latency.py [--cpus 1,2,4,...,256] [--handler seed,...] [--injections 1000]
                            [--json] [--out FILE] [--plot FILE.png]
    python bench/latency.py --compare OLD.json NEW.json
"""
import sys

from emu.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
