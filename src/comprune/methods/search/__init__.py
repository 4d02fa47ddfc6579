"""Widths chosen against the whole model's output (width_allocation="search"; EvoPress, DarwinLM, Týr).

1. database (database.py): every kept block's MLP pruned at a ladder of levels (level l removes l·step neurons)
   on the dense inputs of the layer-pruned model, by the same structured OBS and least-squares refit the walk
   uses. Greedy OBS is nested, so one run to the deepest level gives every level's kept set; each level gets its
   own refit.
2. fitness (fitness.py): KL(dense ‖ stitched) of the next-token distributions on windows held apart from the
   calibration, the stitched model being the layer-pruned model with each block's MLP replaced by its variant.
   The dense log-probabilities are computed once (float16).
3. allocation (optimiser.py): dynamic programming over every block's measured error curve (the KL with that block
   alone at each level), then an evolutionary search from it: level-shift mutations keep the budget exact,
   offspring are filtered on a few windows, and the best few are ranked on all of them. Deterministic for a seed
   and a number of generations; a wall-clock limit may stop it earlier; resumable from its state file.
plan.py turns the budget into ladder levels and runs the three in order. The walk then prunes every block with
its searched count on the already-pruned prefix, as always.
"""
from .database import Database, Ladder, build_database, make_ladder  # noqa: F401
from .fitness import Fitness  # noqa: F401
from .optimiser import dp_allocate, evolve, mutate  # noqa: F401
from .plan import Plan, make_plan, search_allocation  # noqa: F401
