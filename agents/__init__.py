"""agents package of come_rl."""
