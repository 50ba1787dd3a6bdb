"""The experiments CLI (every experiment under --quick), GrokMonitor, and honest grokked/capped reporting."""
import csv
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grokalign_fast import GrokAlign, models
from grokalign_fast.experiments import EXPERIMENTS, common, grok_digits, summary
from grokalign_fast.experiments.__main__ import main as cli_main
from grokalign_fast.monitor import PHASES, GrokMonitor, phase_from_alignment

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """One intra-op thread, as the experiments run (the CLI sets it too); the count is restored after."""
    monkeypatch.setenv("GROKALIGN_NO_TQDM", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check_outputs(folder):
    files = os.listdir(folder)
    assert "summary.json" in files
    with open(os.path.join(folder, "summary.json")) as f:
        result = json.load(f)
    csvs = [n for n in files if n.endswith(".csv")]
    pngs = [n for n in files if n.endswith(".png")]
    assert csvs and pngs, files
    for name in csvs:
        with open(os.path.join(folder, name)) as f:
            rows = list(csv.DictReader(f))
        assert rows, f"{name} is empty"
    for name in pngs:
        with open(os.path.join(folder, name), "rb") as f:
            assert f.read(8) == PNG_MAGIC, name
    return result


# ------------------------------------------------------------------ every experiment under --quick

IN_PROCESS = [n for n in EXPERIMENTS if n != "ntk"]


@pytest.mark.parametrize("name", IN_PROCESS)
def test_experiment_quick_writes_outputs(name, tmp_path):
    cli_main([name, "--quick", "--out", str(tmp_path)])
    result = _check_outputs(tmp_path / name)
    assert result["experiment"] == name and result["quick"] is True
    assert "summary" in result and result["summary"]


def test_cli_subprocess_quick(tmp_path):
    """The ``python -m`` entry point itself (one experiment, in a fresh interpreter)."""
    env = dict(os.environ, GROKALIGN_NO_TQDM="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "grokalign_fast.experiments", "ntk", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=170, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = _check_outputs(tmp_path / "ntk")
    assert "corr(measured, NTK-predicted)" in proc.stdout
    assert result["summary"]["correlation"][0] > 0.9  # the NTK predicts the one-step change of <x, c(x)>


def test_cli_rejects_unknown_experiment():
    with pytest.raises(SystemExit):
        cli_main(["no-such-experiment"])


# ------------------------------------------------------------------ grok-digits: honest grokked / capped reporting


def _digits_cfg(**kw):
    base = dict(max_steps=100, eval_every=50, monitor_every=50, monitor_probe=8)
    base.update(kw)
    return grok_digits.Config(**base)


def _digits_by_hand(cfg, seed):
    """grok-digits' GrokAlign training written out step by step: {step: (train acc, test acc)} at each evaluation."""
    split = grok_digits.load_split(cfg)
    x, y = split.x_train, split.y_train
    gen = common.seed_everything(seed)
    model = models.mlp((64, 200, 200, 10), init_scale=cfg.init_scale)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    reg = GrokAlign(model, generator=torch.Generator().manual_seed(10_000 + seed),
                    **grok_digits.grokalign_kwargs(cfg, "grokalign"))
    onehot = F.one_hot(y, 10).float()
    per_epoch = len(x) // cfg.batch
    accs = {}
    for step in range(1, cfg.max_steps + 1):
        k = (step - 1) % per_epoch
        if k == 0:
            perm = torch.randperm(len(x), generator=gen)
        idx = perm[k * cfg.batch: (k + 1) * cfg.batch]
        out, pen = reg(x[idx])
        opt.zero_grad()
        (F.mse_loss(out, onehot[idx]) + pen).backward()
        opt.step()
        if step % cfg.eval_every == 0:
            accs[step] = (common.accuracy(model, x, y), common.accuracy(model, split.x_test, split.y_test))
    return accs


def test_capped_run_is_not_grokked():
    r = grok_digits.run_one(_digits_cfg(), "grokalign", 0)
    assert r["threshold"] == 0.89  # reachable (a normal init reaches 98.9%), not within 100 steps of the x8 init
    assert r["grokked"] is False and r["capped"] is True
    assert r["grok_step"] is None and r["grok_seconds"] is None and r["phase_steps"] is None
    assert r["steps_run"] == 100
    logged = {row["step"]: (row["train_acc"], row["test_acc"]) for row in r["log"]}
    assert logged == _digits_by_hand(_digits_cfg(), 0)  # the logged accuracies are those of the trained model
    assert all(test < r["threshold"] for _, test in logged.values())
    assert r["final_test_acc"] == logged[100][1]


def test_grokked_is_the_first_evaluation_at_threshold():
    # A normal init (x1) generalises within a few hundred steps: 50% test accuracy is reached early.
    r = grok_digits.run_one(_digits_cfg(init_scale=1.0, threshold=0.5, max_steps=2000), "baseline", 0)
    assert r["grokked"] is True and r["capped"] is False
    step = r["grok_step"]
    assert step % 50 == 0 and r["steps_run"] == step  # the run stops at the grokked state
    accs = {row["step"]: row["test_acc"] for row in r["log"]}
    assert accs[step] >= 0.5
    assert all(a < 0.5 for s, a in accs.items() if s < step)
    assert r["grok_seconds"] > 0 and r["grok_cpu_seconds"] > 0
    # phase: memorisation (train 100%) may come later than 50% test accuracy: then the phase is 0
    assert r["phase_steps"] == (0 if r["mem_step"] is None else max(0, step - r["mem_step"]))


def _fake(method, seed, step):
    g = step is not None
    return dict(method=method, seed=seed, grokked=g, grok_step=step, grok_seconds=None if not g else step / 1000,
                grok_cpu_seconds=None if not g else step / 1000, phase_steps=0 if g else None,
                phase_seconds=0.0 if g else None, steps_run=step if g else 500, mem_step=None)


def test_summary_never_counts_a_capped_run():
    runs = [_fake("baseline", s, v) for s, v in enumerate([400, 420, 440])]
    runs += [_fake("fast", s, v) for s, v in enumerate([40, 44, 42])]
    runs += [_fake("capped", s, v) for s, v in enumerate([100, None, 120])]
    st = summary.summarise(runs, ["baseline", "fast", "capped"])
    assert st["fast"]["all_grokked"] and st["fast"]["speedup_steps"] == pytest.approx(420 / 42)
    assert st["fast"]["p_steps"] < 1e-3
    c = st["capped"]
    assert c["n"] == 3 and c["n_grokked"] == 2 and not c["all_grokked"]
    assert c["steps"] == [100, None, 120] and c["steps_mean"] == pytest.approx(110)
    assert c["speedup_steps"] is None and c["speedup_seconds"] is None  # never a censored speed-up
    st = summary.summarise([_fake("baseline", 0, None), _fake("fast", 0, 40)], ["baseline", "fast"])
    assert st["baseline"]["steps_mean"] is None and st["fast"]["speedup_steps"] is None
    assert st["fast"]["p_steps"] is None


def test_quick_summary_json_reports_capped_runs_as_null(tmp_path):
    cli_main(["grok-digits", "--quick", "--methods", "baseline,grokalign", "--max-steps", "60", "--out", str(tmp_path)])
    with open(tmp_path / "grok-digits" / "summary.json") as f:
        result = json.load(f)
    for m in ("baseline", "grokalign"):
        s = result["summary"][m]
        assert s["n_grokked"] == 0 and s["steps"] == [None] and s["steps_mean"] is None
        assert s["speedup_steps"] is None
    assert all(r["capped"] and r["grok_step"] is None for r in result["runs"])
    assert "not grokked" in result["table"]


# ------------------------------------------------------------------ GrokMonitor


def test_phase_rule_on_synthetic_histories():
    assert phase_from_alignment([]) == "memorising"
    assert phase_from_alignment([0.1]) == "memorising"
    flat = [0.01 + 0.001 * ((-1) ** i) for i in range(20)]
    assert phase_from_alignment(flat) == "memorising"
    rising = [0.01 * i for i in range(20)]
    assert phase_from_alignment(rising) == "aligning"
    plateau = [0.02 * i for i in range(10)] + [0.2] * 10
    assert phase_from_alignment(plateau) == "plateau"
    # a large init can start aligned, lose it, then re-align: the gain counts from the low
    dip = [0.3, 0.01, 0.01, 0.02] + [0.02 + 0.02 * i for i in range(8)]
    assert phase_from_alignment(dip) == "aligning"
    assert phase_from_alignment(dip + [dip[-1]] * 8) == "plateau"
    # below min_gain: a small rise that stopped is still memorising
    assert phase_from_alignment([0.01, 0.02, 0.03] + [0.03] * 8) == "memorising"
    assert set(PHASES) == {"memorising", "aligning", "plateau"}
    with pytest.raises(ValueError):
        phase_from_alignment(rising, window=1)


class _Counting(nn.Module):
    def __init__(self, d=6, c=3):
        super().__init__()
        self.lin = nn.Linear(d, c, bias=False)
        self.batches = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.lin(x)


def test_monitor_values_on_a_linear_model():
    torch.manual_seed(0)
    model = _Counting().double()
    x = torch.randn(5, 6, dtype=torch.float64)
    rec = GrokMonitor(model, x, every=1).step(0)
    W = model.lin.weight.detach()
    c = W.sum(0)  # c(x) = W^T 1 for f(x) = W x
    cos = (x @ c) / (x.norm(dim=1) * c.norm())
    assert rec["centroid_alignment"] == pytest.approx(float(cos.mean()), rel=1e-10)
    assert rec["centroid_norm"] == pytest.approx(float(c.norm()), rel=1e-10)
    assert rec["centroid_inner_product"] == pytest.approx(float((x @ c).mean()), rel=1e-10)
    assert rec["jacobian_norm"] == pytest.approx(float(W.norm()), rel=1e-10)
    s = torch.linalg.svdvals(W)
    assert rec["pc1"] == pytest.approx(float(s[0] ** 2 / (s ** 2).sum()), rel=1e-10)
    p = s / s.sum()
    assert rec["effective_rank"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-10)
    # rank=False: one VJP for the centroid, probes for the norm (exact for a scalar output)
    scalar = nn.Linear(6, 1, bias=False).double()
    rec2 = GrokMonitor(scalar, x, every=1, rank=False).step(0)
    assert rec2["jacobian_norm"] == pytest.approx(float(scalar.weight.detach().norm()), rel=1e-10)
    assert "pc1" not in rec2


def test_monitor_cost_is_bounded_and_leaves_training_untouched():
    model = _Counting()
    model.train()
    x = torch.randn(1000, 6)
    mon = GrokMonitor(model, x, every=10, max_probe=8)
    assert mon.x_probe.shape[0] == 8
    walls = []
    for step in range(0, 101):
        t0 = time.perf_counter()
        mon(step)
        walls.append(time.perf_counter() - t0)
    assert len(mon.history) == 11 and [r["step"] for r in mon.history] == list(range(0, 101, 10))
    assert max(model.batches) == 8  # only the fixed probe batch is ever evaluated
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())  # no parameter gradients
    # the recorded seconds are each call's own time: positive, at most the wall time around the call
    timed = [(r["monitor_seconds"], walls[r["step"]]) for r in mon.history]
    assert all(0 < seconds <= wall for seconds, wall in timed), timed
    assert 0 < mon.total_seconds <= sum(wall for _, wall in timed), (mon.total_seconds, timed)
    assert mon.phase in PHASES


def test_monitor_history_and_csv(tmp_path):
    model = _Counting()
    mon = GrokMonitor(model, torch.randn(4, 6), every=5)
    assert mon.phase is None and mon(3) is None
    mon(0, train_acc=0.5, note="start")
    mon(5, train_acc=0.75)
    mon(7, force=True)
    assert [r["step"] for r in mon.history] == [0, 5, 7]
    assert mon.column("train_acc") == [0.5, 0.75, None]
    path = mon.to_csv(str(tmp_path / "m.csv"))
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    for key in ("step", "centroid_alignment", "centroid_norm", "jacobian_norm", "pc1", "effective_rank", "phase",
                "train_acc", "note"):
        assert key in rows[0]
    assert rows[0]["note"] == "start" and rows[2]["train_acc"] == ""
    assert all(math.isfinite(float(r["centroid_alignment"])) for r in rows)


def test_monitor_ignores_the_initial_record_for_the_phase():
    values = iter([-0.15, 0.003, 0.004, 0.003, 0.004, 0.005, 0.004])
    mon = GrokMonitor(_Counting(), torch.randn(4, 6), every=1)
    mon.measure = lambda: {"centroid_alignment": next(values)}
    phases = [mon(step)["phase"] for step in range(7)]
    assert phases == ["memorising"] * 7  # the jump from the random init's -0.15 is not "aligning"
    values = iter([-0.15, 0.003, 0.004, 0.003, 0.004, 0.005, 0.004])
    mon = GrokMonitor(_Counting(), torch.randn(4, 6), every=1, ignore_first=0)
    mon.measure = lambda: {"centroid_alignment": next(values)}
    assert "aligning" in [mon(step)["phase"] for step in range(7)]
    with pytest.raises(ValueError):
        GrokMonitor(_Counting(), torch.randn(4, 6), ignore_first=-1)


def test_monitor_rejects_bad_arguments():
    with pytest.raises(ValueError):
        GrokMonitor(_Counting(), torch.randn(4, 6), every=0)
    with pytest.raises(ValueError):
        GrokMonitor(_Counting(), torch.randn(6), every=1)
    with pytest.raises(TypeError):
        GrokMonitor(42, torch.randn(4, 6))


def test_method_seeds_option():
    parse = grok_digits.parse_method_seeds
    assert parse("none") == {} and parse("") == {}
    assert parse("baseline=3,grokfast=2") == {"baseline": 3, "grokfast": 2}
    n = grok_digits.seeds_per_method(["baseline", "grokalign"], 5, parse(grok_digits.DEMO_METHOD_SEEDS))
    assert n == {"baseline": 3, "grokalign": 5}
    assert grok_digits.seeds_per_method(["baseline"], 2, {"baseline": 3}) == {"baseline": 2}
    for bad in ("baseline", "nope=2", "baseline=0", "baseline=x"):
        with pytest.raises(SystemExit):
            parse(bad)
    tasks = grok_digits.tasks_for({"grokalign": 2, "baseline": 1})
    assert tasks == [("baseline", 0), ("grokalign", 0), ("grokalign", 1)]  # slow methods first


def _write_idx(path, arr):
    import gzip

    import numpy as np

    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def test_mnist_idx_files_are_used_when_present(tmp_path):
    import numpy as np

    from grokalign_fast.experiments import data

    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (60, 28, 28)))
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 60))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (20, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 20))
    assert data.mnist_available(str(tmp_path)) and not data.mnist_available(str(tmp_path / "nope"))
    split = grok_digits.load_split(grok_digits.Config(n_train=50, data_dir=str(tmp_path)))
    assert split.name == "mnist" and split.x_train.shape == (50, 784) and split.x_test.shape == (20, 784)
    assert 0.0 <= float(split.x_train.min()) and float(split.x_train.max()) <= 1.0
    cfg = grok_digits.Config(n_train=50, batch=25, data_dir=str(tmp_path), max_steps=4, eval_every=2,
                             monitor_every=2, monitor_probe=4)
    r = grok_digits.run_one(cfg, "grokalign", 0)
    assert r["data"] == "mnist" and r["threshold"] == 0.85 and r["steps_run"] <= 4
    assert grok_digits.load_split(grok_digits.Config()).name == "digits"  # no --data-dir: the shipped digits


def test_cnn_robustness_uses_cifar_batches_when_present(tmp_path):
    import pickle

    import numpy as np

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("data_batch_1", 40), ("test_batch", 20)):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    result = cli_main(["cnn-robustness", "--quick", "--data-dir", str(tmp_path), "--steps", "4",
                       "--out", str(tmp_path / "out")])
    assert result["data"] == "cifar10"
    _check_outputs(tmp_path / "out" / "cnn-robustness")


def test_grok_digits_offset_method_trains_a_biased_model_with_the_offset_term():
    cfg = _digits_cfg(max_steps=8, eval_every=4, ga_every=1)
    kw = grok_digits.grokalign_kwargs(cfg, "grokalign-offset")
    assert kw["offset"] == cfg.ga_weight > 0 and kw["estimator"] == "forward"
    r = grok_digits.run_one(cfg, "grokalign-offset", 0)
    assert r["steps_run"] == 8
    # The same steps by hand: a biased MLP, where the offset f(x) - J x is not 0.
    split = grok_digits.load_split(cfg)
    common.seed_everything(0)
    model = models.mlp((64, 200, 200, 10), init_scale=cfg.init_scale, bias=True)
    reg = GrokAlign(model, generator=torch.Generator().manual_seed(10_000), **kw)
    reg(split.x_train[: cfg.batch])
    assert reg.last_offset is not None and reg.last_offset > 0
