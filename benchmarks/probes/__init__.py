"""Kernel probes behind the performance pages (not part of the product): each answers one question about where a
step's time goes, on the machine it runs on. They share `harness.py`."""
