"""Evaluate a saved run: rebuild its script's networks from checkpoint.pt and run deterministic episodes.

    python -m common.evaluate runs/ppo__CartPole-v1__1__20250101-120000-42[/checkpoint.pt] [--episodes 20 --track]

The script that wrote the run (config.json's `"script": "ppo"`: algos/ppo.py, or `--script PATH`) is imported
under a module name other than `__main__` and must define `Args`, `policy_step` and `load_policy(args, checkpoint,
device) -> (model, env_fn)`: the model exactly as main() builds it (normalisation statistics included) with the
checkpoint's weights, on `device`, and `env_fn(seed)` that builds one evaluation env (training=False). With the
defaults (the run's seed and episode count), the mean return is the run's `final_eval_return` (the same
`common.samplers.evaluate`, env seeds and weights). The last line printed is `eval return: MEAN ± STD over N episodes`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Annotated, Literal

import numpy as np
import torch
import tyro

from common.config import resolve_device
from common.envs import UsageError, record_video
from common.logger import CHECKPOINT, load_checkpoint, upload_videos, wandb_run_id
from common.samplers import Episode, evaluate, evaluation_plan

ALGOS_DIR = Path(__file__).resolve().parent.parent / "algos"


@dataclass
class EvaluateArgs:
    path: tyro.conf.Positional[Annotated[str, tyro.conf.arg(metavar="RUN")]]
    """run directory (or its checkpoint.pt) to evaluate"""
    episodes: int | None = None
    """evaluation episodes (default: the run's --eval-episodes)"""
    seed: int | None = None
    """evaluation seed (default: the run's --seed, as its final evaluation)"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """where the networks run: 'auto' picks CUDA when present"""
    capture_video: bool = False
    """record evaluation episodes to <run dir>/videos/, replacing the videos there (see common.envs.record_video)"""
    video_episodes: int = 1
    """how many episodes to record (the first ones of the evaluation, at most --episodes)"""
    track: bool = False
    """add the mean return (summary evaluate/episodic_return) and any videos to the W&B run the training logged to"""
    script: str | None = None
    """the script file that wrote the run (default: algos/<config.json's "script">.py)"""


def resolve_run(path: str | Path) -> tuple[Path, Path]:
    """(run directory, checkpoint file) of a run directory or a checkpoint path; UsageError if missing."""
    path = Path(path)
    run_dir, checkpoint = (path, path / CHECKPOINT) if path.is_dir() else (path.parent, path)
    if not (run_dir / "config.json").is_file():
        raise UsageError(f"{path}: no config.json in {run_dir}; pass the directory of a saved run")
    if not checkpoint.is_file():
        raise UsageError(f"{path}: no checkpoint at {checkpoint}; was the run saved (--save-model)?")
    return run_dir, checkpoint


def import_script(path: str | Path) -> ModuleType:
    """Import a script file as module `rlsolo_script_<stem>` (so that its `__main__` block does not run)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no script at {path}: pass --script with the file that wrote the run")
    name = f"rlsolo_script_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module


def evaluate_run(path: str | Path, episodes: int | None = None, seed: int | None = None,
                 device: torch.device | str = "cpu", video_dir: str | Path | None = None, video_episodes: int = 1,
                 script: str | Path | None = None) -> list[Episode]:
    """Deterministic episodes of a saved run (defaults: its seed and --eval-episodes) under the model that its
    script's `load_policy` rebuilds; optionally recorded."""
    run_dir, checkpoint_path = resolve_run(path)
    config = json.loads((run_dir / "config.json").read_text())
    if script is None:
        if "script" not in config:
            raise UsageError(f"{run_dir}/config.json does not name its script: pass --script algos/NAME.py")
        script = ALGOS_DIR / f"{config['script']}.py"
    module = import_script(script)
    missing = [name for name in ("Args", "policy_step", "load_policy") if not hasattr(module, name)]
    if missing:
        raise UsageError(f"{script} has no {', '.join(missing)}: common.evaluate needs Args, policy_step and "
                         f"load_policy(args, checkpoint, device) -> (model, env_fn)")
    known = {f.name for f in dataclasses.fields(module.Args)}
    args = module.Args(**{k: v for k, v in config.items() if k in known})
    device = torch.device(device)
    model, env_fn = module.load_policy(args, load_checkpoint(checkpoint_path, map_location=device), device)
    episodes = args.eval_episodes if episodes is None else episodes
    seed = args.seed if seed is None else seed
    if video_dir is not None and episodes > 0:
        if video_episodes < 1:
            raise UsageError(f"--video-episodes must be at least 1, got {video_episodes}")
        # The first video_episodes episodes: episode k is the k-th of evaluation env k % E, so env i records as
        # many as a plan of that many episodes gives it (over min(video_episodes, 8) <= E envs).
        env_fn = record_video(env_fn, video_dir, evaluation_plan(min(video_episodes, episodes), seed)[1])
    torch.manual_seed(seed)
    policy_kwargs = module.eval_policy_kwargs(args) if hasattr(module, "eval_policy_kwargs") else {}
    return evaluate(env_fn, module.policy_step, model, episodes, seed, device, **policy_kwargs)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code."""
    args = tyro.cli(EvaluateArgs, args=argv, description=__doc__.split("\n\n")[0])
    try:
        run_dir, _ = resolve_run(args.path)
        device = resolve_device(args)
        video_dir = run_dir / "videos" if args.capture_video else None
        for old_video in video_dir.glob("*.mp4") if video_dir is not None else []:
            old_video.unlink()  # a capture replaces the previous one
        episodes = evaluate_run(args.path, args.episodes, args.seed, device, video_dir, args.video_episodes,
                                args.script)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    returns = [e.ret for e in episodes]
    mean, std = (float(np.mean(returns)), float(np.std(returns))) if returns else (float("nan"), float("nan"))
    for video in sorted(video_dir.glob("*.mp4")) if video_dir is not None else []:
        print(f"video: {video}")
    if args.track:
        upload_evaluation(run_dir, video_dir, mean)
    print(f"eval return: {mean:.2f} ± {std:.2f} over {len(returns)} episodes")
    return 0


def upload_evaluation(run_dir: Path, video_dir: Path | None, mean_return: float) -> None:
    """Add the return (and the videos) to the run's W&B run, resumed by the id its training logged to."""
    import wandb
    config = json.loads((run_dir / "config.json").read_text())
    summary_path = run_dir / "summary.json"
    step = json.loads(summary_path.read_text())["global_step"] if summary_path.is_file() else 0
    run = wandb.init(project=config.get("wandb_project", "rlsolo"), entity=config.get("wandb_entity"),
                     id=wandb_run_id(config.get("run_name") or run_dir.name), resume="allow", dir=str(run_dir))
    upload_videos(run, video_dir, step=int(step))
    run.summary["evaluate/episodic_return"] = mean_return
    run.finish()


if __name__ == "__main__":
    sys.exit(main())
