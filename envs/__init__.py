"""Gymnasium environments of come_rl: Memory Cards, Memory Maze, DeepMind Lab, RECON goal tasks.

Importing this package only registers ids (entry-point strings), so it stays light: MuJoCo,
dm_control and memory-maze are imported when an environment is made.

    import gymnasium as gym, envs
    env = gym.make("come_rl/MemoryMaze9x9-v0")          # 64x64 uint8 frames, poses in info
    env = gym.make("come_rl/MemoryCards-v0")
"""

from gymnasium.envs.registration import register, registry

_REGISTRATIONS: dict[str, tuple[str, dict]] = {
    "come_rl/MemoryCards-v0": ("envs.memory_cards:MemoryCardsEnv", {}),
    "come_rl/MemoryCardsFind-v0": ("envs.memory_cards_find:MemoryCardsFindEnv", {}),
    "come_rl/MemoryMaze9x9-v0": ("envs.memory_maze:MemoryMazeEnv", {"maze_size": 9}),
    "come_rl/MemoryMaze11x11-v0": ("envs.memory_maze:MemoryMazeEnv", {"maze_size": 11}),
    "come_rl/MemoryMaze13x13-v0": ("envs.memory_maze:MemoryMazeEnv", {"maze_size": 13}),
    "come_rl/MemoryMaze15x15-v0": ("envs.memory_maze:MemoryMazeEnv", {"maze_size": 15}),
    "come_rl/DMLabMaze-v0": ("envs.dmlab:DMLabMazeEnv", {}),
}

for _env_id, (_entry_point, _kwargs) in _REGISTRATIONS.items():
    # Re-importing (e.g. importlib.reload in tests) must not raise on duplicate ids.
    if _env_id not in registry:
        register(id=_env_id, entry_point=_entry_point, kwargs=_kwargs, disable_env_checker=True)
