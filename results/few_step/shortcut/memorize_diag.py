"""The shortcut model's LTM after 30 memorization steps, plain loss vs its own shortcut loss (session 27): the loss
at the first and last step, and the one-step (told step size 1) error of base and LTM on 32 memorized clips of one
Memory Cards episode (seed 1000, 60 random steps). Needs the shortcut checkpoint (docs/training.md, "Shortcut models"):

    python results/few_step/shortcut/memorize_diag.py 3e-4 0.0 0.5      # lr, then the shortcut fractions to compare
    python results/few_step/shortcut/memorize_diag.py 1e-4 0.5 0.25
"""

import sys

import numpy as np
import torch

from come_rl.world_model import WorldModel
from envs.memory_cards import MemoryCardsEnv

CHECKPOINT = "runs/cards_shortcut_ckpt"


def run(fraction: float, lr: float) -> None:
    wm = WorldModel.load(CHECKPOINT, experts=["base", "ltm"], precision="fp32")
    env = MemoryCardsEnv()
    frame, info = env.reset(seed=1000)
    wm.reset()
    wm.observe(frame, None, info["pose"])
    rng = np.random.default_rng(0)
    for _ in range(60):
        action = env.random_policy_action(rng)
        frame, *_, info = env.step(action)
        wm.observe(frame, env.action_spec.encode(action), info["pose"])
    frames, actions, _ = wm.memory.sample_clips(32, 4, generator=torch.Generator().manual_seed(5))
    stats = wm.memorize(steps=30, generator=torch.Generator().manual_seed(0), shortcut_fraction=fraction, lr=lr)
    errors = {}
    with torch.no_grad():
        for name in ("base", "ltm"):
            expert = getattr(wm, name)
            expert.step_size = 1.0
            state = expert.prepare(frames[:, :3], actions)
            x = torch.randn(frames[:, 3].shape, generator=torch.Generator().manual_seed(1))
            t = torch.ones(32)
            eps = expert.predict_eps(state, x, t)
            alpha, sigma = expert.schedule.alpha_sigma(t)
            x0 = (x - sigma[:, None, None, None] * eps) / alpha[:, None, None, None].clamp_min(1e-4)
            errors[name] = round(((x0.clamp(-1, 1) - frames[:, 3]) ** 2).mean().item(), 4)
    print(f"lr {lr:g} shortcut_fraction {fraction}: loss {stats['loss_first']:.4f} -> {stats['loss_last']:.4f}, "
          f"one-step MSE {errors}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    for value in sys.argv[2:]:
        run(float(value), float(sys.argv[1]))
