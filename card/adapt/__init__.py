"""Stage 2: continue training a CARD checkpoint under the CARD objective with DeepSpeed ZeRO.

Public API::

    load_recipe(path, overrides=(), output_dir=None) -> Recipe     # validated, paths resolved
    adapt(recipe_or_path, overrides=(), output_dir=None, nproc_per_node=1, ...) -> AdaptResult

Modules, in import order (each imports only those before it):

* ``objective``: the CARD loss and the plain AR loss (pure tensor functions);
* ``recipe``: the recipe schema, YAML loading, overrides and validation;
* ``data``: datasets, tokenising, packing, the validation split, the cache, the batch order;
* ``distributed``: this rank's topology, the process group, ports, the single-process environment;
* ``resolve``: a recipe resolved into a run (model info, objective, precision, DeepSpeed config, lr schedule);
* ``engine``: the DeepSpeed engine, checkpoints (save, prune, resume) and consolidation;
* ``metrics``: ``metrics.jsonl`` and what its keys mean, the final losses, the summary;
* ``train``: the trainer every rank runs (``python -m card.adapt.train``);
* ``launch``: ``adapt()``: preflight, then in-process or torchrun.
"""

from card.adapt.launch import AdaptResult, adapt
from card.adapt.recipe import Recipe, load_recipe

__all__ = ["AdaptResult", "Recipe", "adapt", "load_recipe"]
