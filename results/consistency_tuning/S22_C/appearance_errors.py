import math, numpy as np, torch
from come_rl.data_sources import SeededEpisodePool
pool = SeededEpisodePool("memory_maze", episodes=3, seed=160000)
ds = pool.dataset
tight_min, loose_min, best_tight_frac = [], [], []
allpairs = []
for e in range(3):
    fr = torch.as_tensor(np.asarray(ds.frames[e])).float()
    if fr.shape[-1] == 3: fr = fr.permute(0, 3, 1, 2)
    fr = fr / 127.5 - 1
    poses = torch.as_tensor(np.asarray(ds.poses[e])).float()
    th = torch.nn.functional.avg_pool2d(fr, 4).flatten(1)
    mem, q = slice(0, 400), range(400, 432)
    for t in q:
        d = torch.linalg.vector_norm(poses[mem, :2] - poses[t, :2], dim=-1)
        turn = torch.abs(torch.remainder(poses[mem, 2] - poses[t, 2] + math.pi, 2 * math.pi) - math.pi)
        win = (d <= 1.0) & (turn <= math.radians(45))
        if not win.any(): continue
        tight = (d <= 0.35) & (turn <= math.radians(15))
        err = ((th[mem] - th[t]) ** 2).mean(-1)
        for i in torch.nonzero(win).flatten():
            allpairs.append((float(err[i]), bool(tight[i]), float(d[i]), math.degrees(float(turn[i]))))
        e_w = torch.where(win, err, torch.full_like(err, 9.0))
        best = int(e_w.argmin())
        best_tight_frac.append(bool(tight[best]))
a = np.array([p[0] for p in allpairs]); tt = np.array([p[1] for p in allpairs])
print("pairs", len(a), "tight", tt.sum())
for q in (0.1, 0.25, 0.5, 0.75):
    print(q, "tight", np.quantile(a[tt], q) if tt.any() else None, "loose", np.quantile(a[~tt], q))
print("best-in-window is tight:", np.mean(best_tight_frac), len(best_tight_frac))
for thr in (0.002, 0.005, 0.01, 0.02, 0.04):
    sel = a <= thr
    print(thr, "selected", sel.sum(), "of which tight", (sel & tt).sum())
