"""Streaming consistency (the paper's Figure 2): memorize as the episode streams in, imagine each next chunk."""

import pytest

from come_rl.experiments.streaming import StreamingConfig, check_config, run
from come_rl.world_model import WorldModel
from test_consistency import tiny_checkpoint


def test_the_streaming_command_memorizes_each_chunk_and_writes_its_curve(tmp_path, monkeypatch):
    checkpoint = tiny_checkpoint(tmp_path / "ckpt")
    calls = []
    original = WorldModel.memorize

    def counting(self, *args, **kwargs):
        calls.append((len(self.memory), kwargs.get("window"), kwargs.get("steps")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(WorldModel, "memorize", counting)
    config = StreamingConfig(checkpoint=str(checkpoint), episodes=1, warmup=6, chunk=3, iterations=3, window=5,
                             memorize_steps=2, compositions="copy_last,base,ltm", poses="recorded", threads=1,
                             out_dir=str(tmp_path / "out"))
    rows = run(config)
    # one memorization per iteration, on the last `window` of the frames observed so far (6, then 9, then 12)
    assert calls == [(6, 5, 2), (9, 5, 2), (12, 5, 2)]
    assert [(r["iteration"], r["context"], r["composition"]) for r in rows] == [
        (k, 6 + 3 * k, name) for k in range(3) for name in ("copy_last", "base", "ltm")]
    by = {(r["iteration"], r["composition"]): r for r in rows}
    for k in range(3):
        assert 0 <= by[k, "base"]["lpips_all"] <= 1.5
        assert by[k, "ltm"]["lpips_all"] != by[k, "base"]["lpips_all"]  # the memorized copy imagines otherwise
        assert by[k, "ltm"]["memorize_seconds"] > 0 and by[k, "base"]["memorize_seconds"] == 0.0
    assert by[0, "base"]["lpips_all"] != by[1, "base"]["lpips_all"]  # each iteration scores its own chunk
    out = tmp_path / "out"
    assert (out / "streaming.png").stat().st_size > 0
    summary = (out / "streaming.md").read_text()
    assert "| ltm | mean |" in summary and "| base | 2 |" in summary
    # a rerun resumes from the records (no memorization, same rows); other settings are refused before any work
    calls.clear()
    again = run(config)
    assert calls == [] and [r["lpips_all"] for r in again] == [r["lpips_all"] for r in rows]
    with pytest.raises(ValueError, match="other settings"):
        run(StreamingConfig(**dict(config.__dict__, chunk=4)))


@pytest.mark.parametrize("overrides, message", [
    (dict(compositions="base,teleport"), "unknown"),
    (dict(compositions="base,nearest_view"), "not a streaming row"),
    (dict(chunk=0), "chunk must be >= 1"),
    (dict(warmup=2), "at least 3 frames"),
    (dict(window=80), "window must be between"),
    (dict(memorize_steps=-1), "memorize_steps must be >= 0"),
    (dict(poses="gps"), "poses must be"),
])
def test_bad_streaming_settings_are_refused_before_any_work(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_config(StreamingConfig(**overrides))


def test_a_missing_data_set_is_refused_before_any_work(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; collect one"):
        run(StreamingConfig(data=str(tmp_path / "nowhere"), episodes=1, out_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()  # nothing written
