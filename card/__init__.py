"""CARD toolkit: convert pretrained causal LMs into CARD models, adapt them, evaluate parallel decoding.

Stages live in sub-packages (``card.convert``, ``card.adapt``, ``card.eval``) so that installing the
toolkit never puts top-level modules named ``convert`` or ``eval`` on a user's import path.
"""

__version__ = "0.1.0"
