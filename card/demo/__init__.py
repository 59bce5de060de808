"""The ``card demo`` end-to-end example: synthetic tasks and a character-level tokenizer (``card.demo.tasks``)."""
