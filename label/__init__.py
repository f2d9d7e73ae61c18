"""`paligemma-edge label`: an export over a whole image set, on this machine or on a Ray cluster (Ray Data)."""
