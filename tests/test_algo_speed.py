"""benchmark/algo_speed.py's matmul floor: it records every matrix product of an update and replays them alike."""

import importlib.util
import sys
from collections import Counter

import torch
from conftest import ROOT
from torch.profiler import ProfilerActivity, profile

spec = importlib.util.spec_from_file_location("algo_speed", ROOT / "benchmark" / "algo_speed.py")
algo_speed = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = algo_speed
spec.loader.exec_module(algo_speed)

PROFILED = {"aten::mm": "mm", "aten::addmm": "addmm", "aten::bmm": "bmm", "aten::baddbmm": "baddbmm"}


def counts(calls) -> Counter:
    return Counter(func.__name__.split(".")[0] for func, _, _ in calls)


def test_recorder_sees_every_matmul_of_an_update_backward_included():
    torch.manual_seed(0)
    args = algo_speed.Args(batch_size=16)
    batches = algo_speed.fake_batches(args, torch.device("cpu"), n=2)
    for name, builder in [("sac", algo_speed.sac_update), ("td3", algo_speed.td3_update)]:
        script = algo_speed.load_script(name)
        update = builder(script, 32, args, torch.device("cpu"), False, False)
        per_update = algo_speed.record_matmuls(update, batches, n_updates=2)
        with profile(activities=[ProfilerActivity.CPU]) as prof:  # the next two updates, counted by the profiler
            update(batches[0])
            update(batches[1])
        profiled = Counter({PROFILED[e.key]: e.count for e in prof.key_averages() if e.key in PROFILED})
        assert counts(per_update[0] + per_update[1]) == profiled, name
        # the critics' backward is recorded: more products than the forward passes alone make
        assert sum(profiled.values()) > 12
    # td3 updates its actor every second update: the two recorded updates differ
    assert len(per_update[0]) != len(per_update[1])


def test_floor_replays_the_recorded_products_with_their_layouts():
    torch.manual_seed(0)
    args = algo_speed.Args(batch_size=16)
    batches = algo_speed.fake_batches(args, torch.device("cpu"), n=2)
    update = algo_speed.sac_update(algo_speed.load_script("sac"), 32, args, torch.device("cpu"), False, False)
    per_update = algo_speed.record_matmuls(update, batches, n_updates=2)
    floor = algo_speed.matmul_floor(per_update)
    replayed = []
    for _ in range(2):
        with algo_speed.RecordMatmuls() as recorder:
            floor(None)
        replayed.append(recorder.calls)
    assert replayed == per_update
