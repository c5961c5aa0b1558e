"""Benchmarks (not tests): where the time of imagination, composition and memorization goes.

Usage:
    python -m come_rl.bench world_model [checkpoint=come_rl/checkpoints/memory_cards batch=32 horizon=2 steps=10]
    python -m come_rl.bench world_model device=cuda [precision=bf16 compile=true]
    python -m come_rl.bench memorize [checkpoint=come_rl/checkpoints/memory_cards steps=4 rounds=2 'recipes={...}']
    python -m come_rl.bench planners [decisions=3 device=auto]
    python -m come_rl.bench dit ['names=["dit_cpu"]' 'batch_sizes=[1, 32]']   # the DiT's context cache
    python -m come_rl.bench threads [checkpoint=memory_maze threads=[1,2] busy=[0,1] repeats=5]
    python -m come_rl.bench long_episode [checkpoint=memory_cards steps=1000 memorize_every=50 memorize_steps=25]
    python -m come_rl.bench decision [checkpoint=memory_maze population=24 horizon=4 steps=4 reference_tree=DIR]

``world_model`` writes ``results/bench/world_model.csv`` + ``.md``: imagined frames per second for the base alone and
for every composition (base + LTM; base + LTM + STM + SLTM), the cost ratio to the base, network calls per denoising
step, achieved GFLOP/s of ``imagine`` (FLOPs counted by torch's FlopCounterMode) against the fp32 matmul peak measured
in the same run, memorization time per step for LoRA ranks 8/16/32/64 against one sampling step, and peak memory
(host RSS, and the GPU's peak allocation on CUDA). ``device`` / ``precision`` / ``compile`` are those of
``WorldModel.load`` (``come_rl.devices``); GPU timings wait for the GPU (``torch.cuda.synchronize``).
``threads`` writes ``results/bench/threads.csv`` + ``.md``: one ``imagine`` of the default CEM decision (population 24,
horizon 4, 4 DDIM steps, base + LTM after memorization) at each torch thread count, on a quiet machine and beside
``busy`` other processes that each keep one core busy with 1-thread matmuls (a busy laptop, or a second experiment),
alternating the settings in one run; it chooses ``run.threads`` (issue 14, finding 7).
``long_episode`` writes ``results/bench/long_episode.csv`` + ``.md`` + ``.png``: a random-policy Memory Cards episode of
``steps`` frames streamed through the memory wrapper (the paper's setting: memorize every 50 frames for 25 steps), with
the process's resident and peak memory and the seconds of each memorization call: memory must stay flat and a call must
not cost more as the episode grows.
``decision`` writes ``results/bench/decision.csv`` + ``.md``: one CEM decision of the default run split into imagination,
LPIPS and the planner's own work, in fp32, bf16 autocast (where the CPU has bfloat16 kernels) and fp32 through
torch.compile, with each one's frame difference and plan agreement to fp32; ``reference_tree=`` adds an older
checkout's fp32 decision, timed in fresh processes alternated with this tree's.
All ratios come from one run (these machines are noisy). The STM and SLTM are untrained transformer experts here
(their cost does not depend on their weights) unless the checkpoint holds trained ones.
``memorize`` writes ``results/bench/memorize.csv`` + ``.md``: one memorization step of each recipe (the shipped one,
partial fine-tuning, LoRA) against a sampling step of base + LTM and of CoME at the same batch.
One module per benchmark (``world_model``, ``memorize``, ``planners``, ``threads``, ``long_episode``, ``dit``, ``decision``), what
they share in ``common``, the command line in ``cli``.
"""

from come_rl.bench.cli import SUBCOMMANDS, main

__all__ = ["SUBCOMMANDS", "main"]
