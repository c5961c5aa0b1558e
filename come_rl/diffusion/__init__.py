"""Diffusion core: noise schedules, v/eps parametrisation, noise-level distributions, DDIM/DDPM sampling."""

from come_rl.diffusion.noise_levels import sample_noise_levels
from come_rl.diffusion.parametrization import add_noise, eps_to_x0, v_target, v_to_eps
from come_rl.diffusion.sampler import SamplerConfig, sample, skip_sample
from come_rl.diffusion.schedule import CosineSchedule, LinearSchedule, NoiseSchedule, build_schedule

__all__ = [
    "CosineSchedule", "LinearSchedule", "NoiseSchedule", "SamplerConfig", "add_noise", "build_schedule",
    "eps_to_x0", "sample", "sample_noise_levels", "skip_sample", "v_target", "v_to_eps",
]
