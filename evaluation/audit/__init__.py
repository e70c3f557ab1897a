"""Private audits: the engine (resumable encrypted scoring), metrics with CIs, plots, reports."""
