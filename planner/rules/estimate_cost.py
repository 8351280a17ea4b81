"""Rule: attach the cost model's estimates to the plan."""
from __future__ import annotations

from kql.planner.cost import theoretical_speedup


def estimate_cost(plan):
    """Compute FLOPs per position and the theoretical speedup of incremental
    inference over naive (Krypton eq. 20 / Algorithm 1 over the query's grid),
    and for exact plans the speedup the chosen batching and cutoff can reach;
    put the estimate on the Infer step (changes the plan in place)."""
    ys, xs = plan.positions()
    # incremental plans have the regions already (rules/incremental.py)
    plan.cost = theoretical_speedup(plan.graph, ys, xs, plan.patch, plan.tau,
                                    plan.regions if plan.incremental else None, plan.gates)
    if plan.tau is not None or plan.gates != "exact":  # what approximation adds over exact
        plan.cost_exact = theoretical_speedup(plan.graph, ys, xs, plan.patch)
    n = plan.n_positions
    infer = plan.root.find("Infer")
    naive_flops = float(plan.cost.full_flops) * n
    if not plan.incremental:
        infer.flops = naive_flops
    else:
        from kql.planner.rules.incremental import layer_costs
        bounds = plan.bounds if plan.bounds is not None else plan.batch_size
        inc, _, full = layer_costs(plan.graph, plan.regions, plan.order, bounds)
        total = sum(full[name] if name in plan.full_layers else inc[name] for name in inc)
        infer.flops = total
        plan.r_batched = naive_flops / total if total else float("inf")
    msg = f"R = {plan.cost.r_grid:.2f} over the grid ({plan.cost.r_uniform:.2f} with one patch size per layer"
    if plan.r_batched is not None:
        msg += f", {plan.r_batched:.2f} with the chosen batches and cutoff"
    plan.record("estimate_cost", msg + ")")
    return plan
