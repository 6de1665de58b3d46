"""Inspection tools on top of the core: survey, summary, capture, cost, plots."""
