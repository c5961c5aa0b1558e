"""The x0 parametrization of an expert: exact eps from the network's clean estimate, the capped v-loss, checkpoints."""

import pytest
import torch

from come_rl.checkpoint import expert_spec, load_expert, save_expert
from come_rl.diffusion import CosineSchedule, add_noise, v_target
from come_rl.experts.expert import X0_LOSS_CAP, DiffusionExpert
from come_rl.nets.unet import UNetConfig, VideoUNet

TINY = dict(frame_size=16, unshuffle=2, action_dim=6, context_frames=3, widths=[8, 16], cond_dim=16)


def expert(prediction: str, target: str = "full", seed: int = 0) -> DiffusionExpert:
    torch.manual_seed(seed)
    e = DiffusionExpert(VideoUNet(UNetConfig(**TINY)), CosineSchedule(), target=target, prediction=prediction)
    torch.nn.init.normal_(e.backbone.out_conv.weight, std=0.05)  # an untrained but input-dependent network
    return e.eval()


def batch(b: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    frames = torch.rand(b, 4, 3, 16, 16, generator=g) * 2 - 1
    actions = torch.nn.functional.one_hot(torch.randint(0, 6, (b, 4), generator=g), 6).float()
    return frames, actions


@pytest.mark.parametrize("target", ["full", "residual"])
def test_x0_expert_eps_is_the_noise_its_clean_estimate_implies(target):
    e = expert("x0", target)
    frames, actions = batch()
    t = torch.tensor([0.05, 0.3, 0.7, 0.99])
    eps = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    alpha, sigma = e.schedule.alpha_sigma(t)
    x_next = frames[:, -1]
    z = add_noise(x_next, eps, alpha, sigma)
    with torch.no_grad():
        prepared = e.prepare(frames[:, :-1], actions)
        eps_hat = e.predict_eps(prepared, z, t)
        # What the network says the clean target is, in frame space:
        zt = z - alpha[:, None, None, None] * frames[:, -2] if target == "residual" else z
        x0_net = e.backbone.denoise(prepared.state, zt[:, None], t)[:, 0]
    x0_frame = x0_net + (frames[:, -2] if target == "residual" else 0)
    implied = (z - alpha[:, None, None, None] * x0_frame) / sigma[:, None, None, None]
    torch.testing.assert_close(eps_hat, implied, atol=2e-4, rtol=1e-4)
    # ... and it is not what a v-network with the same weights would say.
    v_eps = alpha[:, None, None, None] * x0_net + sigma[:, None, None, None] * zt
    assert (eps_hat - v_eps).abs().max() > 1e-2


def test_x0_loss_is_the_v_loss_where_uncapped_and_capped_near_clean():
    e = expert("x0")
    frames, actions = batch()
    eps = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    x0 = frames[:, -1]

    def losses(t):
        loss = e.loss(frames, actions, t=t, eps=eps)
        alpha, sigma = e.schedule.alpha_sigma(t)
        with torch.no_grad():
            out = e.backbone(add_noise(x0, eps, alpha, sigma)[:, None], t, frames[:, :-1], actions, None, None)[:, 0]
        # The same network read as an x0 estimate, written as v: v_hat = (alpha z - x0_hat) / sigma.
        z = add_noise(x0, eps, alpha, sigma)
        v_hat = (alpha[:, None, None, None] * z - out) / sigma[:, None, None, None]
        v_loss = (v_hat - v_target(x0, eps, alpha, sigma)).pow(2).mean()
        return float(loss.detach()), float(v_loss), float((out - x0).pow(2).mean())

    high = torch.full((4,), 0.9)  # 1 / sigma^2 < cap: exactly the v-loss
    loss, v_loss, _ = losses(high)
    assert loss == pytest.approx(v_loss, rel=1e-4)
    low = torch.full((4,), 0.05)  # 1 / sigma^2 ~ 165 > cap: the x0 error times the cap
    loss, v_loss, x0_mse = losses(low)
    assert loss == pytest.approx(X0_LOSS_CAP * x0_mse, rel=1e-4)
    assert v_loss > 10 * loss


def test_prediction_round_trips_through_a_checkpoint_and_bad_names_are_refused(tmp_path):
    e = expert("x0")
    e.spec = expert_spec(e, "unet", TINY, extra={"action_spec": {"kind": "discrete", "dim": 6}, "frame_size": 16})
    save_expert(tmp_path, e, e.spec)
    loaded, spec = load_expert(tmp_path, "base")
    assert loaded.prediction == "x0" and spec["prediction"] == "x0"
    with pytest.raises(ValueError, match="unknown expert prediction 'eps'"):
        DiffusionExpert(VideoUNet(UNetConfig(**TINY)), CosineSchedule(), prediction="eps")
