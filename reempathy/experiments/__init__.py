"""Experiments: decode a test set, sweep settings, report — the layer above decoding (never imported by it).

- ``records.py``: the test set's records (prompt, reference, id), checked before anything runs
- ``rundir.py``:  the run directory on disk: manifest, results lines, shards, crash recovery
- ``shard.py``:   many processes (torchrun / accelerate launch): ranks, shares, collectives
- ``run.py``:     ``reempathy run``: records → batched decoding → results.jsonl
- ``sweep.py``:   ``reempathy sweep``: a grid or listed runs, each a resumable run
- ``metrics.py``: per-run numbers (latency percentiles, bootstrap intervals)
- ``report.py``:  ``reempathy report``: tables, CSV, plots
- ``cli.py``:     the three commands' arguments

Formats: docs/experiments.md.
"""
