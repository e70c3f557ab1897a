"""molcloak.evaluation: benchmarks, load checks, audits and reports (clients of molcloak.pipeline)."""
