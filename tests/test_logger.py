"""common.logger: what progress.csv and W&B receive for the training episodes of each logging window."""

import math

import pytest
from conftest import read_progress

from common.config import CommonArgs
from common.logger import RunLogger


class RecordingRun:
    """Stands in for a W&B run: keeps every `log` call."""

    def __init__(self):
        self.logged = []

    def log(self, values, step):
        self.logged.append((step, dict(values)))


def test_episode_returns_are_logged_as_mean_std_min_and_max_of_their_window(tmp_path):
    logger = RunLogger(CommonArgs(output_dir=str(tmp_path), run_name="run", total_timesteps=1000), "test")
    logger.wandb_run = wandb_run = RecordingRun()
    windows = {100: [(10.0, 5), (20.0, 7), (60.0, 9)], 200: [], 300: [(-4.5, 3)]}
    for step, episodes in windows.items():
        logger.log_episodes(step, episodes)

    # By hand: the first window's mean is 30, its deviations -20, -10 and 30; the second holds one episode.
    expected = {
        100: {"charts/episodic_return": 30.0, "charts/episodic_return_std": math.sqrt((400 + 100 + 900) / 3),
              "charts/episodic_return_min": 10.0, "charts/episodic_return_max": 60.0, "charts/episodic_length": 7.0},
        300: {"charts/episodic_return": -4.5, "charts/episodic_return_std": 0.0,
              "charts/episodic_return_min": -4.5, "charts/episodic_return_max": -4.5, "charts/episodic_length": 3.0},
    }
    rows = read_progress(tmp_path / "run")
    assert [int(row["global_step"]) for row in rows] == [100, 300]  # a window without episodes logs nothing
    for row in rows:
        for name, value in expected[int(row["global_step"])].items():
            assert float(row[name]) == pytest.approx(value, rel=1e-12), name
    columns = list(rows[0])
    start = columns.index("charts/episodic_return")
    assert columns[start:start + 4] == ["charts/episodic_return", "charts/episodic_return_std",
                                        "charts/episodic_return_min", "charts/episodic_return_max"]
    assert [step for step, _ in wandb_run.logged] == [100, 300]
    for step, values in wandb_run.logged:
        assert values == pytest.approx(expected[step], rel=1e-12)
    episodes_csv = (tmp_path / "run" / "episodes.csv").read_text().splitlines()
    assert episodes_csv == ["global_step,return,length", "100,10.0,5", "100,20.0,7", "100,60.0,9", "300,-4.5,3"]
