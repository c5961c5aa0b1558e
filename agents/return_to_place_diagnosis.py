"""Why the Memory Maze return-to-a-seen-place agents fail: goal scoring, horizon or model error, each measured.

    python -m agents.return_to_place_diagnosis                      # the 20 held-out episodes of the evaluation
    python -m agents.return_to_place_diagnosis episodes=4 agents=base

The same episodes as ``python -m agents.return_to_place`` (same seeds, explorations, goals and agents). Three
measurements, one per suspected failure mode:

1. **Goal scoring (no model).** Is LPIPS to the goal image low where the goal place is, in reality? Over the real
   frames of each exploration (the goal frame itself left out) and of the oracle's return: the AUC of -LPIPS for
   telling frames within ``success_distance`` of the goal position from the others (0.5: LPIPS does not know where the
   goal is; 1.0: every near frame scores better than every far one), and the LPIPS to the goal of the oracle's first
   and last frame (the oracle reaches the place with whatever heading its path ends in). ``near_best``: the fraction of
   episodes whose real frame with the lowest LPIPS (goal frame excluded) lies within the radius.
2. **Horizon.** The oracle's steps to first get within the radius, against the planner's ``horizon``: when the goal
   lies beyond the horizon, the planner ranks views a few steps ahead by their LPIPS to a view it cannot see yet.
3. **Model error exploited by the planner.** For every step a world-model agent executes: the LPIPS to the goal of the
   frame it imagined for that step (a fresh sample of the chosen plan) and of the real frame that followed;
   ``optimism`` = real - imagined (> 0: the plan looked closer to the goal than it was). ``planned_best``: the best
   (lowest) LPIPS among the planner's candidates at each decision (what the planner believed it could reach at the
   horizon) against ``real_after_plan``, the real LPIPS ``horizon`` steps later (or at the episode end).

Also, on the oracle's return frames only: the AUC of LPIPS to the goal image (``return_auc_goal_image``) against the
AUC of the lowest LPIPS to the goal *place* as the episode memory holds it (``return_auc_place_set``: every exploration
frame within ``PLACE_RADIUS`` of the goal's pose, whatever its heading): does scoring by place instead of by one view
tell near from far?

Writes ``diagnosis.csv``/``.md`` (one row per agent, means over episodes) and ``diagnosis_episodes.csv`` into
``out_dir``, and ``diagnosis.png`` (LPIPS to the goal against distance to the goal place, real frames).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from agents.goal_tasks import frames_to_model_tensor
from agents.return_to_place import OracleAgent, ReturnConfig, WorldModelReturnAgent, build_agent, check_config, explore
from come_rl.cli_args import run_evaluation_cli
from come_rl.metrics.lpips_metric import get_lpips
from come_rl.results import write_table
from come_rl.seeding import episode_seeds
from envs.memory_maze import MemoryMazeEnv

PLACE_RADIUS = 0.5
"""maze cells: exploration frames this close to the goal's pose form the goal place's view set."""


@dataclass
class DiagnosisConfig(ReturnConfig):
    agents: str = "base,ltm"
    out_dir: str = "results/return_to_place"


def auc(scores_positive: np.ndarray, scores_negative: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (the Mann-Whitney AUC)."""
    if len(scores_positive) == 0 or len(scores_negative) == 0:
        return float("nan")
    diff = scores_positive[:, None] - scores_negative[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


class _RecordingObjective:
    """Wraps the agent's objective (scores = -LPIPS, higher is better) and keeps each planning call's best LPIPS."""

    def __init__(self, objective):
        self.objective, self.best = objective, []

    def __call__(self, *args, **kwargs):
        scores = self.objective(*args, **kwargs)
        self.best.append(-float(torch.as_tensor(scores).max()))
        return scores

    def __getattr__(self, name):
        return getattr(self.objective, name)


def _lpips_to(lpips, frames: np.ndarray, goal: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        target = frames_to_model_tensor(goal[None])
        out = [lpips(frames_to_model_tensor(frames[i:i + 64]), target.expand(len(frames[i:i + 64]), -1, -1, -1))
               for i in range(0, len(frames), 64)]
    return torch.cat([o.reshape(-1) for o in out]).numpy()


def run_agent_episode(env, agent, seeds, config: ReturnConfig, lpips) -> dict:
    """One episode of ``agent`` with the per-step record the diagnosis needs."""
    task, observation, info = explore(env, seeds.env, seeds.policy, config.explore_steps, config.min_goal_distance,
                                      config.max_attempts)
    agent.begin(task, seeds)
    recorder = None
    if isinstance(agent, WorldModelReturnAgent):
        recorder = _RecordingObjective(agent.mpc.objective)
        agent.mpc.objective = recorder
    real, imagined, poses, plan_steps = [], [], [task.start_pose], []
    for step in range(config.decisions * config.replan_every):
        action = agent.act(observation, info)
        if agent.replanned:
            plan_steps.append(step)
        observation, _, _, truncated, info = env.step(action)
        agent.observe(observation, action, info)
        real.append(observation)
        imagined.append(agent.imagined_frame())
        poses.append(np.asarray(info["pose"], np.float64))
        if truncated:
            break
    goal = task.goal_frame
    real_lpips = _lpips_to(lpips, np.stack(real), goal)
    record = {"task": task, "real_lpips": real_lpips, "poses": np.stack(poses), "plan_steps": plan_steps,
              "real": np.stack(real)}
    if recorder is not None:
        pairs = [(i, frame) for i, frame in enumerate(imagined) if frame is not None]
        index = [i for i, _ in pairs]
        record["imagined_lpips"] = _lpips_to(lpips, np.stack([f for _, f in pairs]), goal)
        record["real_at_imagined"] = real_lpips[index]
        record["planned_best"] = np.array(recorder.best)
        after = [min(s + config.horizon, len(real)) - 1 for s in plan_steps]
        record["real_after_plan"] = real_lpips[after]
    return record


def diagnose(config: DiagnosisConfig) -> list[dict]:
    names, experts, _ = check_config(config)
    names = [n for n in names if n in ("base", "ltm", "come")]
    torch.set_num_threads(config.threads)

    lpips = get_lpips()
    env = MemoryMazeEnv(maze_size=9)
    out = Path(config.out_dir)
    episode_rows, summaries, scatter = [], [], []
    try:
        oracle_records = []
        for episode in tqdm(range(config.episodes), desc="diagnosis: oracle + scoring"):
            seeds = episode_seeds(config.seed, episode)
            record = run_agent_episode(env, OracleAgent(), seeds, config, lpips)
            task = record["task"]
            frames = np.delete(task.frames, task.goal_index, axis=0)
            positions = np.concatenate([np.delete(task.poses, task.goal_index, axis=0)[:, :2], record["poses"][1:, :2]])
            scores = np.concatenate([_lpips_to(lpips, frames, task.goal_frame), record["real_lpips"]])
            distance = np.linalg.norm(positions - task.goal_pose[:2], axis=1)
            near = distance < config.success_distance
            reach = np.nonzero(np.linalg.norm(record["poses"][1:, :2] - task.goal_pose[:2], axis=1)
                               < config.success_distance)[0]
            scatter.append((distance, scores))
            # the same on the oracle's return frames only, for the goal image and for the goal PLACE as the memory
            # knows it: every exploration frame within PLACE_RADIUS of the goal's pose, any heading (score = the
            # lowest LPIPS to one of them)
            back = np.linalg.norm(record["poses"][1:, :2] - task.goal_pose[:2], axis=1) < config.success_distance
            members = np.nonzero(np.linalg.norm(task.poses[:, :2] - task.goal_pose[:2], axis=1) < PLACE_RADIUS)[0]
            place_scores = np.min([_lpips_to(lpips, record["real"], task.frames[m]) for m in members], axis=0)
            oracle_records.append({"episode": episode, "agent": "oracle", "seed": task.seed,
                                   "scoring_auc": auc(-scores[near], -scores[~near]),
                                   "near_best": int(near[int(np.argmin(scores))]),
                                   "near_frames": int(near.sum()), "frames": len(near),
                                   "lpips_start": float(_lpips_to(lpips, task.frames[-1:], task.goal_frame)[0]),
                                   "lpips_end": float(record["real_lpips"][-1]),
                                   "steps_to_reach": int(reach[0]) + 1 if len(reach) else -1,
                                   "return_auc_goal_image": auc(-record["real_lpips"][back], -record["real_lpips"][~back]),
                                   "return_auc_place_set": auc(-place_scores[back], -place_scores[~back]),
                                   "place_set_frames": len(members)})
        episode_rows += oracle_records
        reached = [r["steps_to_reach"] for r in oracle_records if r["steps_to_reach"] > 0]
        summaries.append({"agent": "oracle (real frames)", "episodes": len(oracle_records),
                          "scoring_auc": float(np.nanmean([r["scoring_auc"] for r in oracle_records])),
                          "near_best": float(np.mean([r["near_best"] for r in oracle_records])),
                          "lpips_start": float(np.mean([r["lpips_start"] for r in oracle_records])),
                          "lpips_end": float(np.mean([r["lpips_end"] for r in oracle_records])),
                          "steps_to_reach_median": float(np.median(reached)) if reached else float("nan"),
                          **{k: float(np.nanmean([r[k] for r in oracle_records])) for k in
                             ("return_auc_goal_image", "return_auc_place_set", "place_set_frames")},
                          "horizon": config.horizon})
        for name in names:
            agent = build_agent(name, experts[name], config)
            rows = []
            for episode in tqdm(range(config.episodes), desc=f"diagnosis: {name}"):
                record = run_agent_episode(env, agent, episode_seeds(config.seed, episode), config, lpips)
                rows.append({"episode": episode, "agent": name, "seed": record["task"].seed,
                             "imagined_lpips": float(record["imagined_lpips"].mean()),
                             "real_lpips": float(record["real_at_imagined"].mean()),
                             "optimism": float((record["real_at_imagined"] - record["imagined_lpips"]).mean()),
                             "planned_best": float(record["planned_best"].mean()),
                             "real_after_plan": float(record["real_after_plan"].mean()),
                             "lpips_start": float(_lpips_to(lpips, record["task"].frames[-1:],
                                                            record["task"].goal_frame)[0]),
                             "lpips_end": float(record["real_lpips"][-1])})
            episode_rows += rows
            summaries.append({"agent": name, "episodes": len(rows), "horizon": config.horizon,
                              **{k: float(np.mean([r[k] for r in rows])) for k in
                                 ("imagined_lpips", "real_lpips", "optimism", "planned_best", "real_after_plan",
                                  "lpips_start", "lpips_end")}})
    finally:
        env.close()
    command = "python -m agents.return_to_place_diagnosis " + " ".join(
        f"{k}={v}" for k, v in dataclasses.asdict(config).items())
    title = (f"Memory Maze return to a seen place: failure-mode diagnosis ({config.episodes} episodes, env seeds "
             f"{config.seed}+, LPIPS-AlexNet to the goal image): `{command}`")
    write_table(out / "diagnosis_episodes.csv", episode_rows, title=title + " (per episode)")
    write_table(out / "diagnosis.csv", summaries, md_path=out / "diagnosis.md", title=title)
    _plot(scatter, out / "diagnosis.png", config.success_distance)
    return summaries


def _plot(scatter, path: Path, radius: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for distance, scores in scatter:
        ax.scatter(distance, scores, s=4, alpha=0.4)
    ax.axvline(radius, color="k", ls=":", lw=1, label="success radius")
    ax.set_xlabel("distance of the real frame's position to the goal place (cells)")
    ax.set_ylabel("LPIPS to the goal image")
    ax.set_title("goal scoring in reality (exploration + oracle frames)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    temporary = path.with_name(path.name + ".tmp.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(temporary, dpi=110)
    plt.close(fig)
    temporary.replace(path)


def main(argv: list[str] | None = None) -> None:
    run_evaluation_cli(sys.argv[1:] if argv is None else argv, DiagnosisConfig, diagnose)


if __name__ == "__main__":
    main()
