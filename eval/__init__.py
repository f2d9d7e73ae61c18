"""`paligemma-edge eval`: task quality of an export on a JSONL data set (and a synthetic shapes set)."""
