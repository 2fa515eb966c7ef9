"""Fault-injection suite: what a killed, corrupted, locked, full or diverging run leaves behind.

One file per fault family; `helpers.py` holds the tiny recipe, the run-folder template (data ->
sparsify finished once per session) and the subprocess helpers; `child.py` is the CLI with one
fault installed (a SIGKILL in the middle of a chosen write), run as a subprocess.

    OMP_NUM_THREADS=1 python -m pytest tests/faults -q
"""
