"""Random PaliGemma checkpoints in Hugging Face format, for tests (tiny, scripted) and benchmarks (full size)."""
