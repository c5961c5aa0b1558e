"""How many distinct action prefixes the first command's CEM decisions imagine: runs `python -m come_rl.run` with the
given overrides and counts, for every imagine() call of a population, the distinct prefixes of length 1..horizon.

    python results/shared_prefixes/count_prefixes.py agent=cem env=memory_maze run.out_dir=/tmp/count_prefixes
"""

import runpy
import sys

import numpy as np
import torch

import come_rl.world_model as world_model

records = []
imagine = world_model.WorldModel.imagine


def counted(self, actions, *args, **kwargs):
    chosen = torch.as_tensor(actions).argmax(-1)
    if chosen.dim() == 2 and chosen.shape[0] > 1:
        records.append([len({tuple(row) for row in chosen[:, :h + 1].tolist()}) for h in range(chosen.shape[1])])
    return imagine(self, actions, *args, **kwargs)


world_model.WorldModel.imagine = counted
sys.argv = ["come_rl.run", *sys.argv[1:]]
try:
    runpy.run_module("come_rl.run", run_name="__main__", alter_sys=True)
finally:
    counts = np.array(records)
    if len(counts):
        print(f"{len(counts)} decisions; distinct prefixes per step (mean): {np.round(counts.mean(0), 1).tolist()}; "
              f"{counts.sum(1).mean():.1f} of {counts.shape[1]} x population frames per decision")
