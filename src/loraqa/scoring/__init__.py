"""Scoring: SQuAD v1.1 and v2.0 exactly as the official scripts, error analysis, and reports. No
torch import anywhere here: scoring a predictions file or reporting on run folders needs none."""
