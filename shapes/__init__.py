"""The synthetic shapes: the scenes and their task set, the small PaliGemmas trained on them and shipped (with the
held-out set), and the demo that runs them — the evidence behind every quality claim."""
