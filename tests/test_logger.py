"""common.logger: what progress.csv and W&B receive for the training episodes of each logging window."""

import json
import math
import sys
import time
from pathlib import Path

import pytest
from conftest import read_progress

from common.config import CommonArgs, UsageError, parse_args, run
from common.evaluate import upload_evaluation
from common.logger import Counters, RunLogger, load_checkpoint


class RecordingRun:
    """Stands in for a W&B run: keeps every `log` call."""

    def __init__(self):
        self.logged = []

    def log(self, values, step):
        self.logged.append((step, dict(values)))


class RecordingWandb:
    """Stands in for the wandb module: keeps the keywords of every `init` and the runs it returned."""

    def __init__(self):
        self.inits, self.runs = [], []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        self.runs.append(RecordingRun())
        self.runs[-1].summary, self.runs[-1].finish = {}, lambda exit_code=0: None
        return self.runs[-1]


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


def test_a_resumed_run_logs_each_step_once_and_counts_the_time_of_every_process(tmp_path):
    args = CommonArgs(output_dir=str(tmp_path), run_name="run", total_timesteps=300)
    first = RunLogger(args, "test")
    for step in (100, 200, 300):  # the run is killed after it logged step 300, its checkpoint at 200
        first.log_episodes(step, [(float(step), 5)])
        first.log(step, {"losses/loss": step / 100})
        if step == 200:
            time.sleep(0.2)
            first.checkpoint({}, Counters(global_step=200))
    first.close()
    saved = load_checkpoint(tmp_path / "run")
    assert saved["global_step"] == 200 and saved["wall_time_s"] >= 0.2

    resumed = RunLogger(CommonArgs(output_dir=str(tmp_path), run_name="run", total_timesteps=300,
                                   resume=str(tmp_path / "run")),
                        "test", Counters(global_step=200, wall_time_s=saved["wall_time_s"]))
    assert resumed.recent_returns == [100.0, 200.0]
    resumed.log_episodes(300, [(-3.0, 4)])
    resumed.log(300, {"losses/loss": 9.0})
    summary = resumed.finish(300, {})

    rows = read_progress(tmp_path / "run")
    assert [(int(row["global_step"]), row["losses/loss"]) for row in rows if row["losses/loss"]] == \
        [(100, "1.0"), (200, "2.0"), (300, "9.0")]
    assert [int(row["global_step"]) for row in rows] == [100, 100, 200, 200, 300, 300]
    wall_times = [float(row["wall_time_s"]) for row in rows]
    assert wall_times == sorted(wall_times) and wall_times[-1] >= saved["wall_time_s"]
    episodes = (tmp_path / "run" / "episodes.csv").read_text().splitlines()
    assert episodes == ["global_step,return,length", "100,100.0,5", "200,200.0,5", "300,-3.0,4"]
    assert saved["wall_time_s"] <= summary["wall_time_s"] < saved["wall_time_s"] + 5
    assert summary["sps"] == pytest.approx(300 / summary["wall_time_s"], rel=1e-2)


def test_a_run_started_again_without_a_checkpoint_starts_its_logs_afresh(tmp_path):
    args = CommonArgs(output_dir=str(tmp_path), run_name="run", total_timesteps=300)
    first = RunLogger(args, "test")
    first.log_episodes(100, [(1.0, 5)])
    first.close()
    again = RunLogger(args, "test")
    again.log_episodes(50, [(2.0, 3)])
    again.close()
    assert (tmp_path / "run" / "episodes.csv").read_text().splitlines() == ["global_step,return,length", "50,2.0,3"]
    assert [int(row["global_step"]) for row in read_progress(tmp_path / "run")] == [50]


def saved_run(tmp_path, script="test", finished=False):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = {**CommonArgs(output_dir=str(tmp_path), run_name="run").__dict__, "script": script}
    (run_dir / "config.json").write_text(json.dumps(config))
    (run_dir / "checkpoint.pt").write_bytes(b"")
    if finished:
        (run_dir / "summary.json").write_text(json.dumps({"global_step": CommonArgs().total_timesteps}))
    return run_dir


def test_resume_takes_no_other_flag_and_only_the_script_that_made_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["algos/test.py"])
    run_dir = saved_run(tmp_path)
    args = parse_args(CommonArgs, ["--resume", str(run_dir)])
    assert args.resume == str(run_dir)
    with pytest.raises(UsageError, match="drop --total-timesteps --seed .edit total_timesteps"):
        parse_args(CommonArgs, ["--resume", str(run_dir), "--total-timesteps", "10", "--seed=3"])
    with pytest.raises(UsageError, match=r"made by algos/test\.py; resume it with that script"):
        RunLogger(args, "other", Counters(global_step=10))
    RunLogger(args, "test", Counters(global_step=10)).close()  # the script itself, or a copy of it


def test_a_new_run_does_not_overwrite_a_saved_one_and_a_finished_run_resumes_to_nothing(tmp_path, monkeypatch,
                                                                                          capsys):
    monkeypatch.setattr(sys, "argv", ["algos/test.py"])
    run_dir = saved_run(tmp_path, finished=True)
    with pytest.raises(UsageError, match="already holds a run: continue it with --resume"):
        parse_args(CommonArgs, ["--output-dir", str(tmp_path), "--run-name", "run"])
    calls = []
    run(calls.append, CommonArgs, ["--resume", str(run_dir)])
    assert calls == [] and "has trained its --total-timesteps" in capsys.readouterr().out
    assert json.loads((run_dir / "summary.json").read_text())["global_step"] == CommonArgs().total_timesteps
    config = json.loads((run_dir / "config.json").read_text())  # a budget raised in config.json: it trains on
    (run_dir / "config.json").write_text(json.dumps({**config, "total_timesteps": config["total_timesteps"] + 1}))
    run(calls.append, CommonArgs, ["--resume", str(run_dir)])
    assert len(calls) == 1 and calls[0].resume == str(run_dir)


def test_a_run_named_group_slash_name_keeps_its_name_and_wandb_run_when_resumed_and_evaluated(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["algos/test.py"])
    monkeypatch.setitem(sys.modules, "wandb", wandb := RecordingWandb())
    args = parse_args(CommonArgs, ["--output-dir", str(tmp_path), "--run-name", "grp/r1", "--track"])
    RunLogger(args, "test").close()
    run_dir = tmp_path / "grp" / "r1"
    (run_dir / "checkpoint.pt").write_bytes(b"")
    resumed = parse_args(CommonArgs, ["--resume", str(run_dir)])
    assert resumed.run_name == "grp/r1" and Path(resumed.output_dir) / resumed.run_name == run_dir
    RunLogger(resumed, "test", Counters(global_step=10)).close()
    upload_evaluation(run_dir, None, 1.5)
    assert [init["id"] for init in wandb.inits] == ["grp-r1"] * 3
    assert [init["name"] for init in wandb.inits[:2]] == ["grp/r1"] * 2


def test_summary_json_is_strict_json_with_null_where_a_number_does_not_exist(tmp_path):
    from launch import read_summary

    logger = RunLogger(CommonArgs(output_dir=str(tmp_path), run_name="run", total_timesteps=10), "test")
    logger.finish(10, {"final_eval_return": math.nan, "final_eval_return_std": math.nan})  # no episode, no evaluation
    text = (tmp_path / "run" / "summary.json").read_text()

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    summary = json.loads(text, parse_constant=refuse)  # what jq and JavaScript accept
    assert summary["train_return_last100"] is None and summary["final_eval_return"] is None
    assert summary["global_step"] == 10
    read = read_summary(tmp_path / "run")
    assert math.isnan(read["train_return_last100"]) and math.isnan(read["final_eval_return"])
