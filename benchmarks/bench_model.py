"""Whole-model benchmark: forward and train-step time of the python/ example hourglass models
(HourglassMixSTE, HourglassMotionBERT, HourglassH2OT, published sizes) with and without hot_kernels,
and the share of TPC + TRA in each (for H2OT: all its pruning stages + its recovery).

    python benchmarks/bench_model.py                          # mixste, motionbert; B = 1, 2 on cpu; 1, 64 on cuda
    python benchmarks/bench_model.py --models h2ot            # hierarchical pruning 243 -> 121 -> 81 -> 27
    python benchmarks/bench_model.py --batch 1,4 --models mixste --out bench-out/model
    python benchmarks/bench_model.py --small                  # small models (seconds; a smoke test)

Paths: ``hot_kernels`` (``use_hot_kernels=True``: TPC and TRA on the default dispatch, the C++
``cpu`` backend on CPU tensors, the fused GPU kernels on CUDA tensors) and ``reference``
(``use_hot_kernels=False``: both modules on plain PyTorch, what the published code computes). The
two models share their weights. Train step = zero_grad + forward + MSE loss + backward (no
optimizer step: it costs the same on both paths).

Share of TPC + TRA: forward pre-hooks capture the inputs of ``model.tpc`` and ``model.tra`` in one
forward; the two modules are then timed alone on those inputs (forward: under no_grad; train:
forward + backward of a fixed output gradient, the input and the module's parameters requiring
grad), with the harness of ``hot-kernels bench`` (hot_kernels.benchmark.time_interleaved: the two
paths round-robin), and divided by the whole model's time in the same mode. Times, speed-ups and
shares use the *minimum* over the repeats (median recorded too): the calls here are long (up to
seconds on a CPU) and few, and load from elsewhere on a shared machine can only add to a call's
time. DESIGN.md's target: the share drops >= 5x with hot_kernels.

Correctness first: the two paths' kept frames must agree (or differ only at near-ties, by the
tie-aware check of hot_kernels.bench_cases on the captured TPC input), and where they agree the
outputs must match to float32 tolerance.

On a CPU the published models are slow (B = 64 would take minutes per step on 2 cores): B = 1
and 2 by default there.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

from hot_kernels import bench_cases as BC
from hot_kernels import benchmark as H

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))

MODELS = {
    # name: (module, class, input features per joint, small config)
    "mixste": ("hourglass_mixste", "HourglassMixSTE", 2, dict(frames=27, keep=9, dim=64, heads=4, depth=4,
                                                                prune_after=2)),
    "motionbert": ("hourglass_motionbert", "HourglassMotionBERT", 3, dict(frames=27, keep=9, dim=64, heads=4,
                                                                          depth=3, prune_after=1, dim_rep=128)),
    "h2ot": ("hourglass_h2ot", "HourglassH2OT", 2, dict(frames=27, keep=(15, 9, 5), prune_at=(1, 2, 3), dim=64,
                                                         heads=4, depth=4)),
}
DEFAULT_MODELS = "mixste,motionbert"


def pruners(model) -> list:
    """The model's TPC modules: H2OT's stages, or the one ``tpc``."""
    return list(model.tpc_stages) if hasattr(model, "tpc_stages") else [model.tpc]


def recoverer(model):
    """The module that recovers the full sequence: ``tra`` (TRA), or H2OT's ``interp``."""
    return model.tra if hasattr(model, "tra") else model.interp


def build(name: str, small: bool, device: torch.device, seed: int = 0):
    """{True: the hot_kernels model, False: the reference model} with identical weights, and the
    number of input features per joint."""
    import importlib

    mod_name, cls_name, in_dim, small_cfg = MODELS[name]
    cls = getattr(importlib.import_module(mod_name), cls_name)
    cfg = small_cfg if small else {}
    torch.manual_seed(seed)
    models = {flag: cls(**cfg, use_hot_kernels=flag).to(device) for flag in (True, False)}
    models[False].load_state_dict(models[True].state_dict())
    return models, in_dim, cfg


def capture(model, poses):
    """The inputs of every TPC stage (and the kept positions each returned) and of the recovery in
    one forward (hooks), and the kept frames."""
    seen = {"tpc": [], "tpc_index": []}
    hooks = []
    for m in pruners(model):
        hooks.append(m.register_forward_pre_hook(lambda m, a: seen["tpc"].append(a[0].detach())))
        hooks.append(m.register_forward_hook(lambda m, a, out: seen["tpc_index"].append(out[1])))
    hooks.append(recoverer(model).register_forward_pre_hook(
        lambda m, a: seen.__setitem__("tra", tuple(t.detach() for t in a))))
    try:
        with torch.no_grad():
            out, index = model(poses, return_index=True)
    finally:
        for h in hooks:
            h.remove()
    return seen, out, index


def check_paths(models, poses) -> tuple[str, dict]:
    """Verdict on the hot_kernels path against the reference path, and the captured inputs."""
    seen, out_hot, idx_hot = capture(models[True], poses)
    _, out_ref, idx_ref = capture(models[False], poses)
    if torch.equal(idx_hot, idx_ref):
        err = float((out_hot - out_ref).abs().max())
        scale = float(out_ref.abs().max())
        if not err <= 1e-4 * max(1.0, scale):
            raise BC.CheckFailed(f"same kept frames but outputs differ by {err:.3g} (max |out| {scale:.3g})")
        verdict = f"same kept frames; outputs agree to {err:.1e}"
    else:
        # Each stage's pick must be valid (up to near-ties) for the input that stage got.
        for m, x_s, idx_s in zip(pruners(models[True]), seen["tpc"], seen["tpc_index"]):
            msgs = BC.selection_violations(x_s.float().mean(2), idx_s, m.f, m.k, m.center)
            if msgs:
                raise BC.CheckFailed("kept frames differ from the reference path beyond near-ties: " + "; ".join(msgs))
        rows = int((idx_hot != idx_ref).any(-1).sum())
        verdict = f"kept frames differ at near-ties in {rows} of {idx_hot.shape[0]} rows (outputs not compared)"
    return verdict, seen


def step_fns(model, poses, target, captured):
    """{what: fn()} for the whole model and the TPC stages / the recovery alone, forward and train."""
    stages = pruners(model)
    rec = recoverer(model)
    tpc_xs, rec_args = captured["tpc"], captured["tra"]
    g = torch.Generator(device=poses.device).manual_seed(1)
    g_tpc = [torch.randn(x.shape[0], m.f, *x.shape[2:], generator=g, device=poses.device, dtype=x.dtype)
             for m, x in zip(stages, tpc_xs)]
    with torch.no_grad():
        rec_shape = rec(*rec_args).shape
    g_rec = torch.randn(rec_shape, generator=g, device=poses.device, dtype=rec_args[0].dtype)
    tpc_ins = [x.clone().requires_grad_() for x in tpc_xs]
    rec_in = rec_args[0].clone().requires_grad_()
    tpc_params = [[p for p in m.parameters() if p.requires_grad] for m in stages]
    rec_params = [p for p in rec.parameters() if p.requires_grad]

    def model_forward():
        with torch.no_grad():
            return model(poses)

    def model_train():
        model.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(poses), target)
        loss.backward()
        return loss

    def tpc_forward():
        with torch.no_grad():
            return [m(x) for m, x in zip(stages, tpc_xs)]

    def tpc_train():
        return [torch.autograd.grad(m(x)[0], [x] + ps, gg) for m, x, ps, gg in zip(stages, tpc_ins, tpc_params, g_tpc)]

    def tra_forward():
        with torch.no_grad():
            return rec(*rec_args)

    def tra_train():
        return torch.autograd.grad(rec(rec_in, *rec_args[1:]), [rec_in] + rec_params, g_rec)

    return {"model forward": model_forward, "model train step": model_train, "tpc forward": tpc_forward,
            "tpc train": tpc_train, "tra forward": tra_forward, "tra train": tra_train}


def run(models_wanted, batches, device, small=False, policy=None, seed=0, autocast=None, log=print):
    """Records (dicts) per model, batch and path, plus one summary per model and batch."""
    records = []
    env = H.environment(device)
    policy = policy or H.TimingPolicy(budget_s=1.5, min_repeat=3, max_repeat=50, warmup=1)
    amp = (lambda: torch.autocast(device.type, dtype=autocast)) if autocast else None
    for name in models_wanted:
        models, in_dim, cfg = build(name, small, device, seed)
        m = models[True]
        n_params = sum(p.numel() for p in m.parameters())
        for B in batches:
            g = torch.Generator(device=device).manual_seed(seed)
            poses = torch.randn(B, m.frames, m.joints, in_dim, generator=g, device=device)
            target = torch.randn(B, m.frames, m.joints, 3, generator=g, device=device)
            with amp() if amp else _null():
                verdict, captured = check_paths(models, poses)
            # Each measurement times the two paths round-robin (a burst of load elsewhere hits both).
            fns = {path: step_fns(models[flag], poses, target, captured)
                   for flag, path in ((True, "hot_kernels"), (False, "reference"))}
            times_by_path = {"hot_kernels": {}, "reference": {}}
            medians = {"hot_kernels": {}, "reference": {}}
            for what in fns["hot_kernels"]:
                pair = {path: (lambda _, fn=fns[path][what]: _amp_call(amp, fn) if amp else fn())
                        for path in fns}
                for path, t in H.time_interleaved(pair, [None], device=device, policy=policy).items():
                    times_by_path[path][what] = t.min_ms
                    medians[path][what] = t.median_ms
            per_path = {}
            for flag, path in ((True, "hot_kernels"), (False, "reference")):
                times = times_by_path[path]
                share_f = (times["tpc forward"] + times["tra forward"]) / times["model forward"]
                share_t = (times["tpc train"] + times["tra train"]) / times["model train step"]
                per_path[path] = times
                rec = dict(model=models[flag].__class__.__name__, config=cfg or "published", params=n_params, B=B,
                           path=path, device=env["device_type"], device_name=env["device"],
                           autocast=str(autocast).replace("torch.", "") if autocast else None,
                           **{f"{k.replace(' ', '_')}_min_ms": v for k, v in times.items()},
                           **{f"{k.replace(' ', '_')}_median_ms": v for k, v in medians[path].items()},
                           tpc_tra_share_forward=share_f, tpc_tra_share_train=share_t, check=verdict,
                           checked=True, versions={k: env[k] for k in ("hot_kernels", "torch", "triton", "cuda",
                                                                       "python")},
                           git_commit=env["git_commit"], date=env["date"])
                records.append(rec)
                log(f"{rec['model']:<20} B={B:<3} {path:<12} forward {times['model forward']:9.1f} ms "
                    f"(TPC+TRA {100 * share_f:5.1f} %)   train step {times['model train step']:9.1f} ms "
                    f"(TPC+TRA {100 * share_t:5.1f} %)")
            h, r = per_path["hot_kernels"], per_path["reference"]
            summary = dict(
                model=m.__class__.__name__, B=B, summary=True, check=verdict,
                forward_speedup=r["model forward"] / h["model forward"],
                train_speedup=r["model train step"] / h["model train step"],
                share_forward_reference=records[-1]["tpc_tra_share_forward"],
                share_forward_hot_kernels=records[-2]["tpc_tra_share_forward"],
                share_train_reference=records[-1]["tpc_tra_share_train"],
                share_train_hot_kernels=records[-2]["tpc_tra_share_train"],
            )
            summary["share_drop_forward"] = summary["share_forward_reference"] / summary["share_forward_hot_kernels"]
            summary["share_drop_train"] = summary["share_train_reference"] / summary["share_train_hot_kernels"]
            records.append(summary)
            log(f"{'':<20} B={B:<3} hot_kernels vs reference: forward {summary['forward_speedup']:.2f}x, train step "
                f"{summary['train_speedup']:.2f}x; TPC+TRA share drops {summary['share_drop_forward']:.1f}x (forward), "
                f"{summary['share_drop_train']:.1f}x (train) [target >= 5x]; {verdict}")
    return records, env


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _amp_call(amp, fn):
    with amp():
        return fn()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma list of: " + ", ".join(MODELS))
    p.add_argument("--batch", default=None, help="comma list of batch sizes (default: 1,2 on cpu; 1,64 on cuda)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--small", action="store_true", help="small models instead of the published sizes")
    p.add_argument("--autocast", choices=["bf16", "fp16"], help="run under torch.autocast with this dtype")
    p.add_argument("--budget", type=float, default=1.5, help="timed seconds per measurement (default 1.5)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--out", help="folder for model.json and command.txt")
    p.add_argument("--host-allocator", choices=H.HOST_ALLOCATOR_CHOICES, default="kept", help=H.HOST_ALLOCATOR_HELP)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    wanted = [m.strip() for m in a.models.split(",")]
    bad = [m for m in wanted if m not in MODELS]
    if bad:
        p.error(f"unknown model(s) {bad}; expected {', '.join(MODELS)}")
    batches = [int(b) for b in (a.batch or ("1,64" if device.type == "cuda" else "1,2")).split(",")]
    policy = H.TimingPolicy(budget_s=a.budget, min_repeat=3, max_repeat=100 if device.type == "cuda" else 30,
                            warmup=2 if device.type == "cuda" else 1)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a.autocast)
    allocator = H.host_allocator(a.host_allocator)
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    records, env = run(wanted, batches, device, a.small, policy, autocast=autocast)
    wall = time.perf_counter() - t0
    print(f"{wall:.0f} s")
    if a.out:
        notes = ["share of TPC + TRA = (TPC alone + TRA alone, on the inputs captured in the model) / whole model; "
                 "train step = zero_grad + forward + MSE + backward (no optimizer step); times, speed-ups and "
                 "shares from the minimum over the repeats (medians recorded too); the two paths timed round-robin"]
        if device.type == "cpu":
            notes.append("CPU: small batches (B = 1, 2): the published models at B = 64 take minutes per step here")
        settings = {"timing": policy.describe(), "host allocator": allocator or "as is (not glibc)"}
        if hasattr(os, "getloadavg"):
            settings["load average"] = f"{load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end (1-minute)"
        path = H.write_results(a.out, records, env, name="model", settings=settings, notes=notes, wall_s=wall)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
