"""Offline data: episode shards with a checksummed manifest, and the clip sampler used for training."""

from come_rl.data.episodes import (
    MANIFEST_NAME,
    Episode,
    EpisodeDataset,
    load_episode_shard,
    read_manifest,
    save_episode_shard,
    shard_file_name,
    verify_shard,
    write_manifest,
)

__all__ = [
    "MANIFEST_NAME",
    "Episode",
    "EpisodeDataset",
    "load_episode_shard",
    "read_manifest",
    "save_episode_shard",
    "shard_file_name",
    "verify_shard",
    "write_manifest",
]
