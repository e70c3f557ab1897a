"""Private screening of compound libraries of any size: `molcloak screen` (engine.py, report.py)."""
