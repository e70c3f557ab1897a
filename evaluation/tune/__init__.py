"""molcloak tune: the sweep and Pareto front (sweep) and per-layer errors (layer_error); the PBS cost model it uses is the core's (molcloak.pipeline.pbs_cost, shared with molcloak fit)."""
