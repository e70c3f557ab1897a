"""molcloak tune: the sweep and Pareto front (sweep), PBS cost calibration (pbs_cost), per-layer errors (layer_error)."""
