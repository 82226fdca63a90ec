"""Campaigns: stress, replay, schedulers (chaos, controlled), shards, Dask.

Above :mod:`emu.machine` (it drives machines), beside :mod:`emu.formats` (the two
do not know each other).
"""
