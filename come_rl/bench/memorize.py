"""``python -m come_rl.bench memorize``: what one memorization (gradient) step costs against one sampling step.

Each recipe is the checkpoint's shipped ``MemorizeConfig`` with a few fields overridden (``recipes``: name -> fields),
timed per gradient step at the recipe's batch after a warm-up step. The reference sampling steps run at that same
batch, in the same process: base + LTM (the checkpoint's default composition for Memory Cards) and CoME (base + LTM +
STM + SLTM with the checkpoint's trained STM / SLTM and its own alphas and gates), each one ``imagine`` of one frame
divided by its denoising steps. Rounds alternate every timed item; the table keeps each one's fastest round.

Why partial fine-tuning is a recipe here: a full fine-tuning step is a forward and a backward with weight gradients
(about 3 forwards) against 1.3 network rows per sampling step of base + LTM; freezing the encoder (``full_parameters``
naming the decoder) stops the backward pass at the decoder. Whether such a memory still recalls is measured by
``python -m come_rl.experiments.recall`` (results/recall/README.md), not here.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from come_rl.bench.common import checkpoint_expert, filled_cards_model
from come_rl.experts.long_term import LongTermMemoryExpert
from come_rl.results import write_table

DECODER = r"(mid_block|mid_attention|up_blocks|upsamples|out_norm|out_conv)\..*"
TOP_LEVEL = r"(up_blocks\.2|out_norm|out_conv)\..*"


@dataclass
class MemorizeBenchConfig:
    checkpoint: str = "come_rl/checkpoints/memory_cards"
    recipes: dict = field(default_factory=lambda: {
        "shipped: full, every weight": {},
        "full, decoder only": {"full_parameters": DECODER},
        "full, top level of the decoder only": {"full_parameters": TOP_LEVEL},
        "LoRA r16": {"method": "lora", "rank": 16, "lora_alpha": 16.0},
    })
    """name -> MemorizeConfig fields that differ from the checkpoint's shipped recipe (JSON on the command line)."""
    steps: int = 4
    """timed gradient steps per recipe and round (after one warm-up step)."""
    sampler_steps: int = 10
    """denoising steps of the reference sampling (the checkpoint's default)."""
    rounds: int = 2
    threads: int = 1
    out_dir: str = "results/bench"

    def __post_init__(self) -> None:
        if not self.recipes or not all(isinstance(v, dict) for v in self.recipes.values()):
            raise ValueError(f"recipes must map names to dicts of MemorizeConfig fields, got {self.recipes!r}")
        if self.steps < 1 or self.sampler_steps < 1 or self.rounds < 1 or self.threads < 1:
            raise ValueError(f"steps, sampler_steps, rounds and threads must be >= 1, got {self.steps}, "
                             f"{self.sampler_steps}, {self.rounds}, {self.threads}")


def bench_memorize(config: MemorizeBenchConfig) -> list[dict]:
    torch.set_num_threads(config.threads)
    stm, sltm = checkpoint_expert(config.checkpoint, "stm"), checkpoint_expert(config.checkpoint, "sltm")
    if stm is None or sltm is None:
        raise FileNotFoundError(f"{config.checkpoint} holds no trained stm/sltm (stm.safetensors, sltm.safetensors): "
                                f"the CoME reference needs them; use come_rl/checkpoints/memory_cards")
    models = {"base+ltm": filled_cards_model(config.checkpoint, config.sampler_steps, ["base", "ltm"], device="cpu",
                                             precision="fp32"),
              "CoME": filled_cards_model(config.checkpoint, config.sampler_steps, ["base", "ltm", "stm", "sltm"], stm,
                                         sltm, device="cpu", precision="fp32")}
    shipped = models["base+ltm"].memorize_config
    recipes = {name: dataclasses.replace(shipped, **fields) for name, fields in config.recipes.items()}
    batches = sorted({recipe.batch_size for recipe in recipes.values()})
    dim = models["base+ltm"].action_spec.dim
    sampling = {(name, b): [] for name in models for b in batches}
    memorizing = {name: [] for name in recipes}
    calls: dict[str, float] = {}  # network calls per sampling step (what the time depends on, not the machine's load)
    trainable = {}
    for model in models.values():
        model.memorize(steps=1)  # the LTM differs from the base, as after memorization
    for round_ in tqdm(range(config.rounds), desc="memorization benchmark rounds"):
        for (name, b), times in sampling.items():
            actions = torch.nn.functional.one_hot(torch.randint(0, dim, (b, 1), generator=torch.Generator()
                                                                .manual_seed(round_)), dim).float()
            models[name].imagine(actions, seed=round_)  # warm-up at this batch
            start = time.perf_counter()
            models[name].imagine(actions, seed=round_)
            times.append((time.perf_counter() - start) / config.sampler_steps)
            calls[name] = models[name].last_network_calls / config.sampler_steps
        model = models["base+ltm"]
        shipped_ltm = model.ltm
        for name, recipe in recipes.items():
            model.ltm = LongTermMemoryExpert(model.base, recipe)
            trainable[name] = sum(p.numel() for p in model.ltm.adapter_parameters)
            model.memorize(steps=1)  # warm-up (optimizer creation)
            memorizing[name].append(model.memorize(steps=config.steps)["seconds"] / config.steps)
        model.ltm = shipped_ltm
    rows = []
    for name, recipe in recipes.items():
        step = min(memorizing[name])
        base_ltm, come = min(sampling[("base+ltm", recipe.batch_size)]), min(sampling[("CoME", recipe.batch_size)])
        rows.append({"recipe": name, "method": recipe.method, "trained_parameters_M": trainable[name] / 1e6,
                     "batch": recipe.batch_size, "memorize_ms_per_step": 1000 * step,
                     "sampling_step_ms_base+ltm": 1000 * base_ltm, "x_base+ltm_sampling_step": step / base_ltm,
                     "sampling_step_ms_CoME": 1000 * come, "x_CoME_sampling_step": step / come,
                     "network_calls_per_step_base+ltm": calls["base+ltm"], "network_calls_per_step_CoME": calls["CoME"],
                     "threads": config.threads, "rounds": config.rounds})
    out = Path(config.out_dir)
    write_table(out / "memorize.csv", rows, md_path=out / "memorize.md",
                title=f"Memorization step vs sampling step at the same batch ({Path(config.checkpoint).name}, "
                      f"{config.sampler_steps}-step DDIM, {config.threads} thread(s), CPU fp32, fastest of "
                      f"{config.rounds} alternated rounds of {config.steps} steps; `python -m come_rl.bench memorize`)")
    return rows
