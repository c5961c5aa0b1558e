"""planners package of come_rl."""
