"""Benchmark one training step with and without the Lipschitz regulariser.

For each model and batch size it times ``utils.engine.train_step`` (the training loop's own step:
forward, loss, backward, SGD) on random data for alpha 0 (plain IR-Net) and alpha > 0 in each
chosen LCR form, and reports medians of step time, images/s, peak memory and the ratios to alpha 0.
Configurations take turns step by step; the time ratio is the median over rounds of each round's
ratio of medians, so load on a shared machine hits all configurations alike.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed steps; on CPU the peak of
the live bytes that ops allocate during one step, from ``torch.profiler``'s memory records
(op granularity: a peak inside a single op is not seen).

``--plain`` adds, for every configuration, its twin with the speed tricks off
(``modules.speed.plain_formulas``); ``--plain pool`` turns off only that trick (the names are in
``modules/speed.py``). The paired ratio of the two rows is what the tricks buy, measured in the same
run.

    python -m tools.bench --models resnet20_1w1a --batch_sizes 128 --device cpu
    python -m tools.bench --models resnet18_1w1a_IR --batch_sizes 128 --device cuda --amp --channels_last
"""
if __package__ in (None, ""):
    raise SystemExit("run the tools from the repository root as modules: python -m tools.bench ...")

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time

import torch

import models
from modules import set_ede_schedule, speed
from modules.lcr import SIGMA_F, SURROGATES, LipschitzRegularizer
from modules.lcr_official import OfficialLCR
from utils.engine import train_step

MIN_ROUNDS, MIN_STEPS = 5, 2  # fewer give paired ratios that a single burst of load can move far
DEFAULT_SOLVER = "default"


def parse_solver(text):
    """``(block, steps)`` of a ``--lcr_solvers`` value: "default" (None, None: modules.singular's defaults
    by size) or "PxK", a block of P vectors for K steps ("1x5": one vector, 5 power steps)."""
    if text == DEFAULT_SOLVER:
        return None, None
    try:
        block, steps = (int(part) for part in text.split("x"))
    except ValueError:
        raise ValueError(f"a solver is 'default' or PxK (block x steps, e.g. 1x5), got {text!r}") from None
    if block < 1 or steps < 1:
        raise ValueError(f"a solver needs a block and steps of at least 1, got {text!r}")
    return block, steps


def hardware(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


class Config:
    """One (model, batch, form) set-up: its own model, optimizer, regulariser and batch."""

    def __init__(self, name, batch, form, alpha, device, channels_last, amp, solver=DEFAULT_SOLVER, plain=None,
                 surrogate="tanh", sigma_f="differentiable"):
        suffix = "" if plain is None else " plain" + ("" if set(plain) == set(speed.TRICKS) else " " + ",".join(plain))
        if form == "paper" and solver != DEFAULT_SOLVER:
            suffix = f" solver {solver}" + suffix
        if form == "paper" and surrogate == "tanh" and sigma_f != "differentiable":
            suffix = f" sigma_F {sigma_f}" + suffix
        if form == "paper" and surrogate != SURROGATES[0]:
            suffix = f" {surrogate}" + suffix
        self.label = ("alpha 0" if form == "none" else f"alpha {alpha:g} {form}") + suffix
        self.form, self.amp, self.plain = form, amp, plain
        info = models.model_info(name)
        classes, side = info.num_classes, info.image_size
        torch.manual_seed(0)
        self.model = models.create_model(name, num_classes=classes).to(device)
        set_ede_schedule(self.model, 0, 1)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=fmt)
        params = list(self.model.parameters())
        self.reg, self.weight = None, 0.0
        if form == "paper":
            block, steps = parse_solver(solver)
            self.reg = LipschitzRegularizer(self.model, steps=steps, surrogate=surrogate, sigma_f=sigma_f, block=block)
        elif form == "official":
            fp = models.create_model(info.fp_twin, num_classes=classes).to(device).to(memory_format=fmt)
            self.reg = OfficialLCR(self.model, fp, batch)
            params += self.reg.parameters()
        if self.reg is not None:
            self.weight = alpha * self.reg.weight_scale
        self.opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
        self.x = torch.randn(batch, 3, side, side, device=device).contiguous(memory_format=fmt)
        self.y = torch.randint(0, classes, (batch,), device=device)
        self.times = []

    def step(self):
        with speed.plain_formulas(*self.plain) if self.plain is not None else contextlib.nullcontext():
            train_step(self.model, self.reg, self.x, self.y, self.opt, self.weight, self.amp)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def native_output_silenced():
    """Send what native code writes to stdout/stderr (the profiler's start/stop and device-count
    lines) to /dev/null for the duration of the block; Python's own printing is flushed first."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [devnull]:
            os.close(fd)


def cpu_peak_bytes(cfg):
    """Peak live bytes of the CPU allocator during one step (profiler memory events, in order)."""
    from torch.profiler import ProfilerActivity, profile
    with native_output_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        cfg.step()
    # self_cpu_memory_usage: bytes an op allocated minus freed outside its children; "[memory]"
    # entries are frees no op claims. Summed in start order they trace the live-bytes curve.
    deltas = [(e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()]
    live = peak = 0
    for _, d in sorted(deltas, key=lambda t: t[0]):
        live += d
        peak = max(peak, live)
    return peak


def measure_memory(cfg, device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        cfg.step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    return cpu_peak_bytes(cfg)


def paired_ratio(times, base_times):
    """Median over rounds of (median step time in the round / alpha 0's median in the same round).

    Rounds interleave the configurations step by step, so each round's ratio compares steps taken
    seconds apart; the median over rounds discards rounds that a burst of load on a shared
    machine distorted.
    """
    return statistics.median(statistics.median(r) / statistics.median(b) for r, b in zip(times, base_times))


def profile_configs(cfgs, top):
    """Where the extra time goes: each LCR config's ops by self CPU time against alpha 0's, one step each."""
    from torch.profiler import profile

    def op_times(cfg):
        with native_output_silenced(), profile() as prof:
            cfg.step()
        return {e.key: e.self_cpu_time_total / 1000 for e in prof.key_averages()}

    base = op_times(cfgs[0])
    for cfg in cfgs[1:]:
        ops = op_times(cfg)
        extra = sorted(((ops.get(k, 0) - base.get(k, 0), k) for k in set(ops) | set(base)), reverse=True)
        print(f"# {cfg.label}: self CPU ms {sum(ops.values()):.1f} against alpha 0's {sum(base.values()):.1f}; "
              f"the {top} ops that grew most (ms: alpha 0 -> this config)")
        for diff, key in extra[:top]:
            print(f"#   {diff:+8.2f}  {base.get(key, 0):8.2f} -> {ops.get(key, 0):8.2f}  {key}")


def run(args):
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:  # callers in the same process (tests) keep their thread count
        torch.set_num_threads(threads)


def _paper_variants(args):
    """``(solver, surrogate, sigma_f)`` of every paper-form config: each solver with tanh and each --sigma_f
    value, and with ede and a detached sigma_F (the only one the regulariser offers with it)."""
    return [(solver, s, f) for solver in args.lcr_solvers for s in args.surrogates
            for f in (args.sigma_f if s == "tanh" else ["detached"])]


def _run(args):
    device = torch.device(args.device)
    rows = []
    print(f"# device: {hardware(device)}; torch {torch.__version__}; steps {args.steps} x rounds {args.rounds}; "
          f"amp {args.amp}; channels_last {args.channels_last}")
    if args.rounds < MIN_ROUNDS or args.steps < MIN_STEPS:
        print(f"# warning: {args.rounds} rounds of {args.steps} steps are too few for a stable ratio on a shared "
              f"machine; use at least --rounds {MIN_ROUNDS} --steps {MIN_STEPS}")
    for name in args.models:
        for batch in args.batch_sizes:
            cfgs = []
            for form in ["none"] + args.forms:
                for plain in [None, args.plain or list(speed.TRICKS)] if args.plain is not None else [None]:
                    variants = _paper_variants(args) if form == "paper" else [(DEFAULT_SOLVER, SURROGATES[0], None)]
                    for solver, surrogate, sigma_f in variants:
                        try:
                            cfgs.append(Config(name, batch, form, args.alpha, device, args.channels_last, args.amp,
                                               solver, plain, surrogate, sigma_f))
                        except ValueError as exc:  # e.g. the official form on a network without stages
                            print(f"# {name}: no {form} form ({exc})")
            for cfg in cfgs:
                for _ in range(args.warmup):
                    cfg.step()
            mem = {cfg.label: measure_memory(cfg, device) for cfg in cfgs}
            for _ in range(args.rounds):
                for cfg in cfgs:
                    cfg.times.append([])
                for _ in range(args.steps):
                    for cfg in cfgs:  # one step of each in turn: noise hits every config alike
                        sync(device)
                        t0 = time.perf_counter()
                        cfg.step()
                        sync(device)
                        cfg.times[-1].append(time.perf_counter() - t0)
            base = cfgs[0]
            for cfg in cfgs:
                t = statistics.median([s for r in cfg.times for s in r])
                ratio = paired_ratio(cfg.times, base.times)
                rows.append({"model": name, "batch": batch, "config": cfg.label, "step_ms": 1000 * t,
                             "img_s": batch / t, "peak_mib": mem[cfg.label] / 2**20,
                             "time_ratio": ratio, "mem_ratio": mem[cfg.label] / max(mem[base.label], 1)})
            if args.profile:
                profile_configs(cfgs, args.profile)
    print("| model | batch | config | step ms | img/s | peak MiB | time / alpha 0 | memory / alpha 0 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['config']} | {r['step_ms']:.1f} | {r['img_s']:.0f} | "
              f"{r['peak_mib']:.0f} | {r['time_ratio']:.3f} | {r['mem_ratio']:.3f} |")
    return rows


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20_1w1a"], choices=models.list_models(),
                   help="models to time (default resnet20_1w1a)")
    p.add_argument("--batch_sizes", nargs="+", type=int, default=[128], help="batch sizes (default 128)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when present)")
    p.add_argument("--forms", nargs="+", default=["paper", "official"], choices=["paper", "official"],
                   help="LCR forms to compare with alpha 0 (default both; official needs a ResNet with stages)")
    p.add_argument("--alpha", type=float, default=8.0, help="alpha of the LCR runs (default 8)")
    p.add_argument("--lcr_solvers", nargs="+", default=[DEFAULT_SOLVER], metavar="SOLVER",
                   help="the paper form's spectral-norm solvers to time, each as its own config: 'default' "
                        "(modules.singular's block and steps by size) or PxK, a block of P vectors for K steps "
                        "(1x5: one vector, 5 power steps, the previous round's estimate); default: default")
    p.add_argument("--surrogates", nargs="+", choices=SURROGATES, default=[SURROGATES[0]],
                   help="the paper form's --lcr_surrogate values to time, each as its own config; ede with "
                        "--lcr_sigma_f detached (default: tanh)")
    p.add_argument("--sigma_f", nargs="+", choices=SIGMA_F, default=["differentiable"],
                   help="the paper form's --lcr_sigma_f values to time with the tanh surrogate, each as its own "
                        "config (default: differentiable)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per config (default 3)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per config per round (default 3)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--plain", nargs="*", choices=speed.TRICKS, default=None, metavar="TRICK",
                   help=f"also time every config with these speed tricks off ({', '.join(speed.TRICKS)}; "
                        f"none named: all of them; modules/speed.py)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA)")
    p.add_argument("--channels_last", action="store_true", help="channels-last memory format")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile one step of each config and list the N ops whose self CPU time "
                        "grew most against alpha 0 (default 0: no profile)")
    return p


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.exit(1, "error: --device cuda but this machine has no GPU; pass --device cpu\n")
    if min(args.batch_sizes) < 2 or args.steps < 1 or args.rounds < 1 or args.warmup < 0:
        parser.exit(1, "error: --batch_sizes need at least 2 images, --steps and --rounds at least 1\n")
    for solver in args.lcr_solvers:
        try:
            parse_solver(solver)
        except ValueError as exc:
            parser.exit(1, f"error: --lcr_solvers: {exc}\n")
    return run(args)


if __name__ == "__main__":
    main()
