"""``python -m come_rl.bench <benchmark> [key=value ...]``: the one entry point of the benchmarks (see the package)."""

from __future__ import annotations

import importlib
import sys

from come_rl.cli_args import parse_cli

# benchmark -> (module of come_rl.bench, its function, its settings dataclass)
BENCHMARKS = {
    "world_model": ("world_model", "bench_world_model", "WorldModelBenchConfig"),
    "memorize": ("memorize", "bench_memorize", "MemorizeBenchConfig"),
    "planners": ("planners", "bench_planners", "PlannersBenchConfig"),
    "threads": ("threads", "bench_threads", "ThreadsBenchConfig"),
    "long_episode": ("long_episode", "bench_long_episode", "LongEpisodeBenchConfig"),
    "dit": ("dit", "bench_dit", "DitBenchConfig"),
    "decision": ("decision", "bench_decision", "DecisionBenchConfig"),
    "decision_steps": ("decision", "bench_decision_steps", "DecisionStepsBenchConfig"),
    "find_decision_steps": ("decision", "bench_find_decision_steps", "FindDecisionStepsBenchConfig"),
    "place_decision": ("decision", "bench_place_decision", "PlaceDecisionBenchConfig"),
    "memory_format": ("memory_format", "bench_memory_format", "MemoryFormatBenchConfig"),
}
SUBCOMMANDS = tuple(BENCHMARKS)


def main(argv: list[str] | None = None) -> None:
    """Run one benchmark; each module is imported only when its benchmark runs."""
    argv = sys.argv[1:] if argv is None else argv
    usage = f"usage: python -m come_rl.bench {'|'.join(SUBCOMMANDS)} [key=value ...]"
    if argv and argv[0] in ("--help", "-h"):
        print(f"{usage}\n(python -m come_rl.bench <benchmark> --help lists its settings)")
        raise SystemExit(0)
    if not argv or argv[0] not in SUBCOMMANDS:
        raise SystemExit(usage)
    module_name, function, config_name = BENCHMARKS[argv[0]]
    module = importlib.import_module(f"come_rl.bench.{module_name}")
    run, config_cls = getattr(module, function), getattr(module, config_name)
    for row in run(parse_cli(argv[1:], config_cls)):
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})
