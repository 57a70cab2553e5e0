"""The process around a run: torchrun ranks (distributed.py) and one process per folder (locks.py)."""
