"""Benchmark scripts: each measures one thing and writes JSON plus a table or plot under ``results/``.

Run them as modules from the repository root (``.venv/bin/python -m benchmarks.long_context``); their
shared machinery (engine runs, pair statistics, machine rates, the calibration) is the library in
``vllm_helix/harness/``, tested on its own. A script imports another only for its results page
(``measure_hardware`` writes the long-context page through ``long_context``).
"""
