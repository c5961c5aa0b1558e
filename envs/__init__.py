"""envs package of come_rl."""
