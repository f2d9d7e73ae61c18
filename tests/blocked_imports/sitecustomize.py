"""Put on PYTHONPATH by tests/test_layering.py: every Python process started with PALIGEMMA_EDGE_BLOCK set
(bench workers included) cannot import the modules it names, as if they were not installed."""

import os
import sys

for _name in filter(None, os.environ.get("PALIGEMMA_EDGE_BLOCK", "").split(",")):
    sys.modules[_name] = None  # `import name` now raises ImportError
