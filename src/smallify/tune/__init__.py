"""``compress``: the search across compression families under an accuracy bound (see search.py)."""
from smallify.tune.compress import compress, replay
from smallify.tune.goal import Goal
from smallify.tune.recipe import Recipe, Step, load_recipe, recipe_from_dict
from smallify.tune.search import BudgetError, CompressResult

__all__ = [
           "BudgetError",
           "CompressResult",
           "Goal",
           "Recipe",
           "Step",
           "compress",
           "load_recipe",
           "recipe_from_dict",
           "replay",
]
