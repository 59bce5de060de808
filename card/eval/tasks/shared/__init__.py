"""lm-eval tasks over the shared real evaluation files (PIQA, HellaSwag, GSM8K, TinyStories)."""
