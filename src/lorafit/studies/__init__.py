"""Studies over runs: evaluate, compare, merge, sweep."""
