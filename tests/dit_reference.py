"""The uncached reference of the video DiT, for the tests: context and targets as one sequence under one dense mask.

It gives what ``VideoDiT.denoise(VideoDiT.prepare(...), noisy, t)`` gives (tests/test_dit.py checks it to 1e-5), so it
proves the context cache, the banded window attention and the additive masks exact. It reads the model's internals
(``self`` is the model); it lives with the tests, not in the library's hot path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from come_rl.nets.dit import VideoDiT


def denoise_uncached(
    self: VideoDiT,
    context: torch.Tensor,
    actions: torch.Tensor,
    noisy: torch.Tensor,
    t: torch.Tensor | float,
    poses: torch.Tensor | None = None,
    drop_context: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference: context and targets as one sequence under one dense mask, nothing cached.

    Gives the same output as ``denoise(prepare(...), noisy, t)`` (tested to 1e-5); it exists to
    prove the cache, the banded window attention and the additive masks exact (it applies the plain
    boolean masks), and to time the cost the cache saves.
    """
    state = {"last_frame": context[:, -1]}
    num_context, num_targets = self._validate_prepare(context, actions, poses, drop_context)
    state.update(num_targets=num_targets)
    t = self._validate_denoise(state, noisy, t)
    context_visible = None if drop_context is None or not bool(drop_context.any()) else ~drop_context
    if context_visible is not None:
        state["last_frame"] = state["last_frame"] * context_visible[:, None, None, None].to(context.dtype)
    frame_conditions = self._frame_conditions(actions.to(context.dtype), poses, context_visible)
    offset = self.context_frames - num_context
    context_tokens = self.context_patch_embed(self._patchify(context)) + self.spatial_position \
        + self.temporal_position[offset:offset + num_context][None, :, None, :]
    tokens = torch.cat([context_tokens, self._embed_targets(state, noisy)], dim=1)
    levels = torch.cat([torch.zeros(t.shape[0], num_context, device=t.device, dtype=t.dtype),
                        t[:, None].expand(-1, num_targets)], dim=1)
    conditions = frame_conditions + self._noise_embedding(levels)

    positions = torch.arange(num_context + num_targets, device=context.device)
    masks = {full: self._token_mask(self._frame_mask(positions, positions, num_context, full, context_visible))
             for full in {self.config.is_full_attention(layer) for layer in range(self.config.depth)}}
    for layer, block in enumerate(self.blocks):
        mask = masks[self.config.is_full_attention(layer)]
        tokens, _, _ = block(tokens, conditions,
                             lambda q, k, v, mask=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        if str(layer) in self.recurrences:
            # Block-causal recurrence: the targets start from the context's final state, which
            # dropped rows replace by zeros.
            recurrence = self.recurrences[str(layer)]
            context_part, context_state = recurrence(tokens[:, :num_context], None)
            if context_visible is not None:
                context_state = context_state * context_visible[:, None, None].to(context_state.dtype)
            target_part, _ = recurrence(tokens[:, num_context:], context_state)
            tokens = torch.cat([context_part, target_part], dim=1)
    return self._output(tokens[:, num_context:], conditions[:, num_context:], noisy)
