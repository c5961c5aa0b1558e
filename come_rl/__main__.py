"""``python -m come_rl``: the toolkit's commands in one list.

Every command takes ``key=value`` overrides composed by Hydra (``come_rl.run`` from its YAML groups in
``come_rl/conf``, the others from their settings dataclass, ``come_rl.cli_args``) and lists them with ``--help``.
"""

from __future__ import annotations

import sys

# (module, what it does); each runs as ``python -m <module> [key=value ...]``
COMMANDS: tuple[tuple[str, str], ...] = (
    ("come_rl.run", "goal reaching: an MPC agent plans in the world model while the memory wrapper feeds it"),
    ("come_rl.train", "train an expert (base, stm, sltm) of a world model; resumes; torchrun for DDP"),
    ("come_rl.distill", "a checkpoint that samples with a distilled expert (train one: come_rl.train distill_from=...)"),
    ("come_rl.evaluate", "one-step error of a trained expert against copy-last-frame on held-out clips"),
    ("come_rl.collect", "record episodes of an env into a data set (shards with SHA-256 manifest)"),
    ("come_rl.bench", "benchmarks: world_model | memorize | planners | threads | long_episode | dit | decision"),
    ("come_rl.checkpoint", "sign | verify checkpoint directories (weight sums, formats, finiteness)"),
    ("come_rl.experiments.recall", "Memory Cards recall: does memorization change what the model imagines?"),
    ("come_rl.experiments.consistency", "Memory Maze consistency (paper Table 1): imagined vs real frames, revisits apart"),
    ("agents.find_object", "Memory Cards: uncover the tile the world model imagines hides the goal object"),
    ("agents.find_object_tuning", "tune the find-the-object agent on its tuning seeds"),
    ("agents.return_to_place", "Memory Maze: return to a place seen earlier in the episode"),
    ("agents.return_to_place_diagnosis", "why return-to-place episodes fail (planner vs world model)"),
    ("agents.nwm_protocol", "NWM's open-loop planning protocol on recorded episodes (ATE / RPE tables)"),
)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] not in ("--help", "-h"):
        raise SystemExit(f"python -m come_rl lists the commands; run one as python -m <command> (got {argv[0]!r})")
    width = max(len(module) for module, _ in COMMANDS)
    print("come_rl commands (python -m <command> --help lists each one's settings):")
    for module, what in COMMANDS:
        print(f"  {module:<{width}}  {what}")


if __name__ == "__main__":
    main()
