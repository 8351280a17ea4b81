"""Rule: attach the cost model's estimates to the plan."""
from __future__ import annotations

from kql.planner.cost import theoretical_speedup
from kql.planner.plan import Estimates
from kql.planner.rules.incremental import layer_costs


def estimate_cost(plan):
    """Compute FLOPs per position and the theoretical speedup of incremental
    inference over naive (Krypton eq. 20 / Algorithm 1 over the query's grid),
    and for exact plans the speedup the chosen batching and cutoff can reach:
    ``plan.estimates`` (changes the plan in place)."""
    starts = plan.positions()
    # incremental plans have the regions already (rules/incremental.py)
    cost = theoretical_speedup(plan.graph, *starts, plan.patch, tau=plan.tau,
                               regions=plan.regions if plan.incremental else None, gates=plan.gates)
    # what thresholding adds over exact
    cost_exact = theoretical_speedup(plan.graph, *starts, plan.patch) if plan.approximation is not None else None
    naive_flops = float(cost.full_flops) * plan.n_positions
    if not plan.incremental:
        plan.estimates = Estimates(cost, naive_flops)
    else:
        order, bounds = plan.batches()
        inc, _, full = layer_costs(plan.graph, plan.regions, order, bounds)
        total = sum(full[name] if name in plan.full_layers else inc[name] for name in inc)
        plan.estimates = Estimates(cost, total, naive_flops / total if total else float("inf"), cost_exact)
    msg = f"R = {cost.r_grid:.2f} over the grid ({cost.r_uniform:.2f} with one patch size per layer"
    if plan.r_batched is not None:
        msg += f", {plan.r_batched:.2f} with the chosen batches and cutoff"
    plan.record("estimate_cost", msg + ")")
    return plan
