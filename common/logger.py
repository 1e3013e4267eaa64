"""Run directory, console progress, CSV and Weights & Biases logging, checkpoints.

Every run writes `<output-dir>/<run-name>/` with `config.json`, `progress.csv`, `episodes.csv` (global_step, raw
return and length of every finished training episode), `checkpoint.pt` (written atomically: a run killed at any
moment leaves the previous checkpoint intact) and, at the end, `summary.json`. Metric names: `charts/episodic_return`
(with `_std`, `_min`, `_max`), `charts/SPS`, `losses/<name>`, `eval/<name>`, `charts/info/<key>` (`--info-keys`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import distributed
from common.envs import UsageError, record_video
from common.samplers import evaluate

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(run_dir: str | Path, state: Mapping[str, Any]) -> None:
    """Write `state` to <run_dir>/checkpoint.pt atomically (temporary file, fsync, rename)."""
    path = Path(run_dir) / CHECKPOINT
    tmp = path.with_suffix(".pt.tmp")
    with open(tmp, "wb") as f:
        torch.save(dict(state), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class Counters:
    """The step counters of a run; a checkpoint saves them with the objects the script declares."""

    global_step: int = 0  # environment steps, summed over environments
    n_updates: int = 0  # gradient updates
    updates_owed: float = 0.0  # updates that the replay ratio owes and that have not run yet
    owed_through: int = 0  # the step up to which `updates_owed` counts the steps taken
    wall_time_s: float = 0.0  # seconds trained, over every process that ran the run (up to the checkpoint)

    def updates_due(self, replay_ratio: float, learning_starts: int = 0) -> range:
        """The updates that the steps taken since the last call pay for: `replay_ratio` an environment step once
        `global_step` has reached `learning_starts`, none before. A fraction left over is owed to the next call."""
        new_steps, self.owed_through = self.global_step - self.owed_through, self.global_step
        if self.global_step < learning_starts:
            return range(0)
        self.updates_owed += replay_ratio * new_steps
        due = int(self.updates_owed)
        self.updates_owed -= due
        return range(due)


def checkpoint_state(trained: Mapping[str, Any], counters: Counters) -> dict:
    """What a checkpoint holds: the counters, the state of each object in `trained` (by name: modules, optimizers, LR
    schedulers, replay buffers, anything with `state_dict`; tensors, a learned temperature) and, under "rng", the
    states of Python's, numpy's, torch's and CUDA's global generators, loadable with weights_only=True."""
    state = {name: obj.detach().clone() if isinstance(obj, torch.Tensor) else obj.state_dict()
             for name, obj in trained.items()}
    python_version, python_state, python_gauss = random.getstate()
    _, numpy_state, numpy_pos, *numpy_gauss = np.random.get_state()  # numpy_gauss: is a normal draw cached, its value
    rng = {"python": list(python_state), "python_version": python_version, "python_gauss": python_gauss,
           "numpy": numpy_state.tolist(), "numpy_pos": int(numpy_pos), "numpy_gauss": numpy_gauss,
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {**state, **dataclasses.asdict(counters), "rng": rng}


def restore_checkpoint(run_dir: str | Path | None, trained: Mapping[str, Any], device: torch.device | str = "cpu",
                       init_from: str | Path | None = None) -> tuple[Counters, dict | None]:
    """Load <run_dir>/checkpoint.pt into every declared object and the RNG states; returns (counters, checkpoint), whose
    undeclared entries are the caller's (a replay buffer that a sampling process loads). A new run (`run_dir` None) gets
    fresh counters, no checkpoint and, with `init_from` (--init-from), that run's modules and tensors (`warm_start`)."""
    counters = Counters()
    if run_dir is None:
        if init_from is not None:
            warm_start(init_from, trained, device)
        return counters, None
    checkpoint = load_checkpoint(run_dir, device)
    if checkpoint is None:
        raise UsageError(f"--resume {run_dir}: no {CHECKPOINT} there yet; start the run afresh")
    missing = [name for name in trained if name not in checkpoint]
    if missing:
        raise UsageError(f"--resume {run_dir}: the checkpoint has no {', '.join(missing)}; it was written by "
                         "another script: resume it with that script")
    for name, obj in trained.items():
        try:
            if isinstance(obj, torch.Tensor):
                with torch.no_grad():
                    obj.copy_(checkpoint[name])
            else:
                obj.load_state_dict(checkpoint[name])
        except (KeyError, RuntimeError, ValueError) as error:
            detail = " ".join(str(error).split())[:300]
            raise UsageError(f"--resume {run_dir}: its {name} does not fit this run's ({detail}); resume it "
                             "with the script that made it") from None
    for counter in dataclasses.fields(counters):
        setattr(counters, counter.name, checkpoint.get(counter.name, counter.default))
    counters.owed_through = checkpoint.get("owed_through", counters.global_step)  # equal at every checkpoint
    rng = checkpoint["rng"]
    random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_gauss"]))
    np.random.set_state(("MT19937", np.array(rng["numpy"], dtype=np.uint32), rng["numpy_pos"],
                         *rng.get("numpy_gauss", (0, 0.0))))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return counters, checkpoint


def warm_start(run_dir: str | Path, trained: Mapping[str, Any], device: torch.device | str = "cpu") -> None:
    """Load the modules and tensors that `trained` declares from a run (the rest, counters and RNG start afresh)."""
    checkpoint = load_checkpoint(run_dir, device)
    if checkpoint is None:
        raise UsageError(f"--init-from {run_dir}: no {CHECKPOINT} there; pass the directory of a saved run")
    for name, obj in trained.items():
        if not isinstance(obj, (torch.nn.Module, torch.Tensor)):
            continue
        if name not in checkpoint:
            raise UsageError(f"--init-from {run_dir}: the checkpoint has no {name}; it was written by another script")
        try:
            if isinstance(obj, torch.Tensor):
                if obj.shape != checkpoint[name].shape:
                    raise RuntimeError(f"shape {tuple(checkpoint[name].shape)} against {tuple(obj.shape)}")
                with torch.no_grad():
                    obj.copy_(checkpoint[name])
            else:
                obj.load_state_dict(checkpoint[name])
        except RuntimeError as error:
            detail = " ".join(str(error).split())
            raise UsageError(f"--init-from {run_dir}: its {name} does not fit this run's ({detail[:300]}); "
                             "use the network flags of that run (see its config.json)") from None


def load_checkpoint(run_dir_or_file: str | Path, map_location: str | torch.device = "cpu") -> dict | None:
    """Load a checkpoint saved by `save_checkpoint` (weights_only=True); None if there is none yet."""
    path = Path(run_dir_or_file)
    path = path / CHECKPOINT if path.is_dir() else path
    return torch.load(path, map_location=map_location, weights_only=True) if path.is_file() else None


def keep_rows_until(path: Path, step: int) -> tuple[list[str], list[dict]]:
    """Drop a csv log's rows after `step` (a resumed run writes them again); returns (header, rows kept) or ([], [])."""
    if not path.is_file():
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    kept = [row for row in rows if int(row["global_step"]) <= step]
    if len(kept) < len(rows):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=reader.fieldnames)
            writer.writeheader()
            writer.writerows(kept)
    return reader.fieldnames or [], kept


def git_commit() -> str | None:
    """The repository's current commit, if the code runs from a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class RunLogger:
    """Console progress, progress.csv and (with --track) W&B for one run; only the main process logs."""

    def __init__(self, args: Any, script: str, counters: Counters | None = None):
        """`script`: the name config.json records; `counters`: as restored on --resume (where this process starts)."""
        counters = counters or Counters()
        self.args = args
        self.enabled = distributed.is_main()  # under data-parallel training, other ranks write nothing
        self.run_dir = Path(args.output_dir) / args.run_name
        self.total_steps = args.total_timesteps
        self.start_step = start_step = counters.global_step
        self.start_time = time.time()
        self.earlier_wall_time_s = counters.wall_time_s  # the run's time in the processes before this one
        self.update_clock = (self.start_time, counters.n_updates)  # for charts/updates_per_second
        self.last_print, self.last_checkpoint = 0.0, self.start_time
        self.last_sps_time, self.last_sps_step = self.start_time, start_step
        self.recent_returns: list[float] = []
        self.interactive = sys.stdout.isatty()
        self.wandb_run = None
        self.columns: list[str] = []
        self.csv_path, self.episodes_path = self.run_dir / "progress.csv", self.run_dir / "episodes.csv"
        self.files: dict[str, Any] = {}  # progress.csv and episodes.csv, open for appending, flushed per write
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(vars(args))
        config["script"] = script  # which algos/<script>.py wrote the run: common.evaluate reloads it from there
        config_path = self.run_dir / "config.json"
        made_by = json.loads(config_path.read_text()).get("script") if args.resume and config_path.exists() else None
        if made_by not in (None, script):  # a copy of a script keeps the name it writes here, and may resume
            raise UsageError(f"--resume {self.run_dir}: the run was made by algos/{made_by}.py; resume it with "
                             "that script")
        if args.resume is None or not config_path.exists():
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if args.resume is None:
            self.episodes_path.unlink(missing_ok=True)  # a run that never checkpointed, started again
        else:
            self.columns, _ = keep_rows_until(self.csv_path, start_step)
            _, episodes = keep_rows_until(self.episodes_path, start_step)
            self.recent_returns = [float(row["return"]) for row in episodes][-100:]
            print(f"resumed from step {start_step} ({self.run_dir})", flush=True)
        if args.track:
            import wandb
            commit = git_commit()
            self.wandb_run = wandb.init(
                project=args.wandb_project, entity=args.wandb_entity, name=args.run_name,
                id=wandb_run_id(args.run_name), resume="allow", config=config, dir=str(self.run_dir), save_code=True,
                tags=[script, args.env_id, args.sampler] + ([f"git-{commit}"] if commit else []),
                group=getattr(args, "wandb_group", None) or f"{script}__{args.env_id.replace('/', '-')}")

    @property
    def video_dir(self) -> Path | None:
        """<run dir>/videos with --capture-video on the main process, else None (see common.envs.record_video)."""
        return self.run_dir / "videos" if getattr(self.args, "capture_video", False) and self.enabled else None

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record scalar metrics (floats, ints or 0-dim tensors, converted with a single host sync)."""
        if not self.enabled:
            return
        values = to_floats(metrics)
        self._write_csv({"global_step": step, "wall_time_s": round(self.wall_time_s(), 3), **values})
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def log_updates(self, counters: Counters, metrics: Mapping[str, Any]) -> None:
        """`log` an update's metrics and charts/updates_per_second since the last call (or this process's start)."""
        now = time.time()
        last_time, last_updates = self.update_clock
        self.update_clock = (now, counters.n_updates)
        rate = (counters.n_updates - last_updates) / max(now - last_time, 1e-9)
        self.log(counters.global_step, {**metrics, "charts/updates_per_second": rate})

    def log_episodes(self, step: int, episodes: Iterable[tuple]) -> None:
        """Log finished training episodes (raw return, length[, {info key: value}] as in samplers.Episode) as the
        means charts/episodic_return, _length and charts/info/<key>, with the population std, min and max of this
        call's returns (charts/episodic_return_std, _min, _max). Under data-parallel training every rank must call
        this once per iteration: episodes are gathered from all ranks."""
        episodes = distributed.gather_objects(list(episodes))
        if not episodes or not self.enabled:
            return
        returns = [float(episode[0]) for episode in episodes]
        lengths = [int(episode[1]) for episode in episodes]
        info: dict[str, list[float]] = {}
        for episode in episodes:
            for key, value in (episode[2] if len(episode) > 2 else {}).items():
                info.setdefault(f"charts/info/{key}", []).append(value)
        self.recent_returns = (self.recent_returns + returns)[-100:]
        if "episodes" not in self.files:
            new_file = not self.episodes_path.exists()
            self.files["episodes"] = open(self.episodes_path, "a", newline="")
            if new_file:
                self.files["episodes"].write("global_step,return,length\n")
        self.files["episodes"].writelines(f"{step},{r!r},{n}\n" for r, n in zip(returns, lengths))
        self.files["episodes"].flush()
        mean = sum(returns) / len(returns)
        std = math.sqrt(sum((r - mean) ** 2 for r in returns) / len(returns))
        self.log(step, {"charts/episodic_return": mean, "charts/episodic_return_std": std,
                        "charts/episodic_return_min": min(returns), "charts/episodic_return_max": max(returns),
                        "charts/episodic_length": sum(lengths) / len(lengths),
                        **{name: sum(values) / len(values) for name, values in info.items()}})

    def _write_csv(self, row: dict) -> None:
        new = [k for k in row if k not in self.columns]
        if new:  # a new column: progress.csv is rewritten with the wider header
            if "progress" in self.files:
                self.files.pop("progress").close()
            old_rows = []
            if self.csv_path.exists() and self.columns:
                with open(self.csv_path, newline="") as f:
                    old_rows = list(csv.DictReader(f))
            self.columns += new
            with open(self.csv_path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.columns)
                writer.writeheader()
                writer.writerows(old_rows)
        if "progress" not in self.files:
            self.files["progress"] = open(self.csv_path, "a", newline="")
            self.csv_writer = csv.DictWriter(self.files["progress"], fieldnames=self.columns)
        self.csv_writer.writerow(row)
        self.files["progress"].flush()

    def wall_time_s(self) -> float:
        """Seconds the run has trained, in this process and the ones it resumed from."""
        return self.earlier_wall_time_s + time.time() - self.start_time

    def progress(self, step: int) -> None:
        """Print a progress line (at most every --log-every-s seconds) and log charts/SPS."""
        now = time.time()
        if not self.enabled or now - self.last_print < self.args.log_every_s:
            return
        sps = (step - self.last_sps_step) / max(now - self.last_sps_time, 1e-9)
        self.last_print, self.last_sps_time, self.last_sps_step = now, now, step
        self.log(step, {"charts/SPS": sps})
        fraction = min(step / max(self.total_steps, 1), 1.0)
        bar = "#" * int(20 * fraction) + "." * (20 - int(20 * fraction))
        elapsed = time.time() - self.start_time
        overall_sps = (step - self.start_step) / elapsed if elapsed > 0 else 0.0  # since the start of this process
        eta = (self.total_steps - step) / overall_sps if overall_sps > 0 else float("inf")
        ret = f"{np.mean(self.recent_returns):.1f}" if self.recent_returns else "-"
        line = (f"[{bar}] {100 * fraction:5.1f}% {step}/{self.total_steps} steps | {sps:.0f} SPS | return {ret} | "
                f"eta {format_duration(eta) if math.isfinite(eta) else '-'}")
        print(("\r" + line) if self.interactive else line, end="" if self.interactive else "\n", flush=True)

    def checkpoint(self, trained: Mapping[str, Any], counters: Counters) -> None:
        """Save the declared objects, counters and RNG states now (when --save-model; rank 0 only)."""
        counters.wall_time_s = self.wall_time_s()
        if self.args.save_model and self.enabled:
            save_checkpoint(self.run_dir, checkpoint_state(trained, counters))
        self.last_checkpoint = time.time()

    def maybe_checkpoint(self, trained: Mapping[str, Any], counters: Counters) -> None:
        """`checkpoint` if --checkpoint-every-s seconds have passed since the last one."""
        if self.enabled and self.args.save_model and time.time() - self.last_checkpoint >= self.args.checkpoint_every_s:
            self.checkpoint(trained, counters)

    def finish(self, step: int, summary: Mapping[str, Any]) -> dict:
        """Write summary.json (global_step, wall_time_s and sps over every process of the run, + `summary`; null for
        a number that does not exist, such as the training return of a run that ended no episode), close the loggers."""
        if self.interactive and self.enabled:
            print()
        wall_time_s = self.wall_time_s()
        result = {"global_step": int(step), "wall_time_s": round(wall_time_s, 3),
                  "sps": round(step / wall_time_s if wall_time_s > 0 else 0.0, 2),
                  # the metric CleanRL reports: mean raw return of the last 100 training episodes
                  "train_return_last100": float(np.mean(self.recent_returns)) if self.recent_returns else float("nan"),
                  **to_floats(summary)}
        if not self.enabled:
            return result
        written = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in result.items()}
        (self.run_dir / "summary.json").write_text(json.dumps(written, indent=2, allow_nan=False) + "\n")
        if self.wandb_run is not None:
            upload_videos(self.wandb_run, self.video_dir, step)
            self.wandb_run.summary.update(result)
            self.wandb_run.finish()
            self.wandb_run = None
        self.close()
        print(f"run directory: {self.run_dir}")
        print("summary: " + ", ".join(f"{k}={v}" for k, v in result.items()))
        return result

    def close(self) -> None:
        """Close the csv files, and W&B if the run ends early (error, Ctrl-C)."""
        while self.files:
            self.files.popitem()[1].close()
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1)
            self.wandb_run = None


def wandb_run_id(run_name: str) -> str:
    """The W&B id of the run named `run_name` (config.json's run_name), for training and common.evaluate alike."""
    return run_name.replace("/", "-")[-64:]


def upload_videos(wandb_run: Any, video_dir: str | Path | None, step: int) -> None:
    """Log every mp4 in `video_dir` to the W&B run as `videos/<file stem>` (nothing if there is none)."""
    if wandb_run is None or video_dir is None or not Path(video_dir).is_dir():
        return
    import wandb
    videos = {f"videos/{p.stem}": wandb.Video(str(p), format="mp4") for p in sorted(Path(video_dir).glob("*.mp4"))}
    if videos:
        wandb_run.log(videos, step=step)


def to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Convert metric values to floats; all tensors are moved to the host in one transfer."""
    tensors = {k: v for k, v in metrics.items() if isinstance(v, torch.Tensor)}
    values = {k: float(v) for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
    if tensors:
        stacked = torch.stack([v.detach().float().reshape(()) for v in tensors.values()]).cpu().tolist()
        values.update(zip(tensors, stacked))
    return values


class Evaluation:
    """A run's deterministic evaluation, every --eval-every steps and at the end: whole episodes of the evaluation env
    under `policy_step(model, ..., deterministic=True, **policy_kwargs)` (the script's `eval_policy_kwargs(args)`, as in
    common.evaluate), seeded by --seed in a generator state of its own: a stochastic evaluation (evaluation epsilon)
    matches common.evaluate's, and training draws as without evaluations. Only rank 0 evaluates (others report NaN)."""

    def __init__(self, args: Any, env_fn: Callable[[int], Any], policy_step: Callable, model: Any,
                 device: torch.device, start_step: int = 0, **policy_kwargs: Any):
        self.args, self.env_fn, self.policy_step, self.model = args, env_fn, policy_step, model
        self.device, self.policy_kwargs = device, policy_kwargs
        self.next_step = (start_step // args.eval_every + 1) * args.eval_every if args.eval_every > 0 else None
        self.last: tuple[int, list[float]] | None = None  # the step and returns of the latest periodic evaluation

    def returns(self, video_dir: Path | None = None) -> list[float]:
        """The returns of --eval-episodes episodes (the first recorded to `video_dir` when given)."""
        if not distributed.is_main():
            return []
        env_fn = record_video(self.env_fn, video_dir)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.args.seed)
            return [e.ret for e in evaluate(env_fn, self.policy_step, self.model, self.args.eval_episodes,
                                            self.args.seed, self.device, **self.policy_kwargs)]

    def maybe_log(self, logger: RunLogger, step: int) -> None:
        """Evaluate and log eval/episodic_return once `step` reaches the next multiple of --eval-every."""
        if self.next_step is None or step < self.next_step:
            return
        self.next_step = (step // self.args.eval_every + 1) * self.args.eval_every
        returns = self.returns()
        self.last = (step, returns)
        if returns:
            logger.log(step, {"eval/episodic_return": float(np.mean(returns))})

    def finish(self, logger: RunLogger, step: int) -> dict:
        """The final evaluation (recorded with --capture-video), logged and written into summary.json. Without a
        video, a periodic evaluation of this same step (same policy, same seeds) gives the final returns."""
        if self.last is not None and self.last[0] == step and logger.video_dir is None:
            final = self.last[1]
        else:
            final = self.returns(logger.video_dir)
            if final:
                logger.log(step, {"eval/episodic_return": float(np.mean(final))})
        mean, std = (float(np.mean(final)), float(np.std(final))) if final else (float("nan"), float("nan"))
        return logger.finish(step, {"final_eval_return": mean, "final_eval_return_std": std})
