"""The width search's optimiser without torch: dynamic programming, budget-keeping mutations, the evolution loop."""
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

# Runs in a fresh interpreter where `import torch` fails; the module is loaded from its file, so neither comprune's
# package __init__ (which imports torch) nor anything else of comprune comes with it.
SCRIPT = textwrap.dedent('''
    import importlib.util, itertools, random, sys
    from types import SimpleNamespace
    sys.modules["torch"] = None
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("torch was importable")
    spec = importlib.util.spec_from_file_location("optimiser", sys.argv[1])
    opt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(opt)
    assert "torch" not in {m for m in sys.modules if sys.modules[m] is not None}

    # Greedy by marginal cost takes block 1's cheap first level (2), then block 0's (3): 5. The optimum puts both
    # levels on block 0: 3.1.
    assert opt.dp_allocate({0: [0.0, 3.0, 3.1], 1: [0.0, 2.0, 10.0]}, 2) == {0: 2, 1: 0}
    # With a speed budget of one whole block (level 3), the cheapest allocation of 3 levels is that block alone,
    # although three single levels cost less.
    costs = {0: [0.0, 1.0, 2.5, 5.0], 1: [0.0, 1.0, 2.5, 9.0], 2: [0.0, 1.0, 2.5, 9.0]}
    assert opt.dp_allocate(costs, 3) == {0: 1, 1: 1, 2: 1}
    assert opt.dp_allocate(costs, 3, removed_level=3, min_removed=1) == {0: 3, 1: 0, 2: 0}
    # the DP against every allocation of a random case
    rng = random.Random(1)
    costs = {i: [0.0] + [rng.random() * l for l in range(1, 4)] for i in range(4)}
    best = min((sum(costs[i][l] for i, l in enumerate(ls)), ls)
               for ls in itertools.product(range(4), repeat=4) if sum(ls) == 5)
    got = opt.dp_allocate(costs, 5)
    assert abs(sum(costs[i][l] for i, l in got.items()) - best[0]) < 1e-12

    # Mutations keep the total exact and every level on the ladder (or at the removal's level), and are the
    # same for the same seed.
    top, removed = 3, 6
    start = {0: 2, 1: 0, 2: 1, 3: 3, 4: 1}
    for seed in range(200):
        kid = opt.mutate(start, top, random.Random(seed), 1 + seed % 3, removed, removable=(1, 2, 3))
        assert sum(kid.values()) == sum(start.values()), (seed, kid)
        assert all(0 <= v <= top or (v == removed and i in (1, 2, 3)) for i, v in kid.items()), (seed, kid)
        assert kid == opt.mutate(start, top, random.Random(seed), 1 + seed % 3, removed, removable=(1, 2, 3))
        plain = opt.mutate(start, top, random.Random(seed), 3)
        assert sum(plain.values()) == sum(start.values()) and all(0 <= v <= top for v in plain.values())

    # The evolution with a stand-in fitness: the budget holds, the parent never gets worse, and it finds the
    # optimum of a separable quadratic.
    target = {0: 3, 1: 0, 2: 3, 3: 0, 4: 1}
    class Quadratic:
        removed_level = None
        windows = list(range(4))
        def population(self, kids, windows=None, parent=None, record=False):
            fits = [float(sum((k[i] - target[i]) ** 2 for i in k)) for k in kids]
            return (fits, [None] * len(kids)) if record else fits
    cfg = SimpleNamespace(search_time=0, search_generations=60, seed=0, search_offspring=8, search_filter=2,
                          search_survivors=2)
    levels, trace = opt.evolve(Quadratic(), start, top, cfg, None, False)
    assert sum(levels.values()) == sum(start.values())
    fits = [f for _, f in trace]
    assert all(b <= a for a, b in zip(fits, fits[1:]))
    assert levels == target and fits[-1] == 0.0
''')


def test_optimiser_runs_without_torch():
    root = Path(importlib.util.find_spec("comprune").submodule_search_locations[0])
    path = root / "methods" / "search" / "optimiser.py"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
