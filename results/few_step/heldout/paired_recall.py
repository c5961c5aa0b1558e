import json, glob, numpy as np
from scipy import stats
base = "results/few_step/heldout/records/memory_cards_recall_s{}/episode_records/"
name = "PoCE w=2.5, gated t>=0.8"
def load(steps):
    out = {}
    for f in sorted(glob.glob(base.format(steps) + "*.npz")):
        with np.load(f) as z:
            row = json.loads(str(z["row"]))
        for n, st, start, tiles in row["scores"]:
            if n == name:
                out[f.split("/")[-1]] = (start, [h for _, h in tiles])
    return out
a, b = load(2), load(10)
for start in ("covered", "uncovered"):
    keys = [k for k in a if a[k][0] == start and k in b]
    d = np.array([np.mean(a[k][1]) - np.mean(b[k][1]) for k in keys])
    h = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    r2 = np.mean([x for k in keys for x in a[k][1]]); r10 = np.mean([x for k in keys for x in b[k][1]])
    both = sum(x and y for k in keys for x, y in zip(a[k][1], b[k][1])); only2 = sum(x and not y for k in keys for x, y in zip(a[k][1], b[k][1])); only10 = sum(y and not x for k in keys for x, y in zip(a[k][1], b[k][1]))
    print(f"{start}: episodes {len(keys)} tiles {16*len(keys)}: 2 steps {100*r2:.1f} %, 10 steps {100*r10:.1f} %, 2 - 10 per episode {100*d.mean():+.1f} ± {100*h:.1f} points; tiles only at 2: {only2}, only at 10: {only10}, both {both}")
