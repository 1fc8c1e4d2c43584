"""Tools built around runs: bench, plan, profile and its report, compare, export.

See kd/README.md for the package map.
"""
