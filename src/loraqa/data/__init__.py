"""Data: questions from files (SQuAD JSON, JSON Lines, CSV, Parquet, datasets folders, the hub) to
Examples, then prompts, token features with answer-only labels, and batches."""
