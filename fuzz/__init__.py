"""Fuzz targets (targets.py) and their time-bounded runner (run.py): ``make fuzz``."""
