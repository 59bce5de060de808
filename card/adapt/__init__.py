"""Stage 2: continue training a CARD checkpoint under the CARD objective with DeepSpeed ZeRO.

Public API::

    load_recipe(path, overrides=(), output_dir=None) -> Recipe     # validated, paths resolved
    adapt(recipe_or_path, overrides=(), output_dir=None, nproc_per_node=1, ...) -> AdaptResult

Modules: ``recipe`` (schema and validation), ``data`` (datasets, tokenising, packing, cache), ``train``
(the DeepSpeed loop every rank runs), ``launch`` (in-process or torchrun), ``objective`` (the CARD loss).
"""

from card.adapt.launch import AdaptResult, adapt
from card.adapt.recipe import Recipe, load_recipe

__all__ = ["AdaptResult", "Recipe", "adapt", "load_recipe"]
