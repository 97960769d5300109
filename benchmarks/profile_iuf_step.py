"""Seconds per IUF training step and where they go (torch profiler), on random tokens and images.

Run: ``OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.profile_iuf_step [--steps 50] [--batch 16] [--projected] [key=value ...]``

One step = the method's own ``IUF.train_step`` (jitter, OASA, reconstruction, CE, SCL losses + backward +
gradient clipping + optimizer step); ``--projected`` adds the incremental-step work (Eq. 12 projection of every
``iuf.projection_layers`` update on a random activation span, retention toward the previous weights).
Prints the mean wall seconds per step after 3 warm-up steps, then the profiler's top operators over 5
steps. The backbone is not involved (IUF caches its features once per task).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from components.backbones.registry import build_backbone
from components.config import load_config
from components.methods.iuf import IUF
from components.methods.iuf_network import ActivationSpan


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=None, help="images per step (default iuf.batch_size)")
    parser.add_argument("--projected", action="store_true", help="include projection + retention (incremental steps)")
    parser.add_argument("--rows", type=int, default=20, help="profiler table rows")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config("params.yaml", ["method=iuf", *args.overrides])
    torch.manual_seed(cfg.seed)
    method = IUF(cfg, build_backbone(cfg.backbone, cfg.data.image_size))
    batch = args.batch or cfg.iuf.batch_size
    size = cfg.data.image_size
    tokens = torch.randn(batch, method.grid[0] * method.grid[1], method.extractor.channels)
    images = method.network.image_inputs(torch.rand(batch, 3, size, size))
    if method.network.oasa is not None:
        method.network.oasa.head.grow(2, torch.Generator().manual_seed(0))
    labels = torch.randint(0, 2, (batch,))
    old_state = {n: p.detach().clone() for n, p in method.network.named_parameters()} if args.projected else {}
    bases = {}
    if args.projected:
        for name, module in method.projected_modules().items():
            span = ActivationSpan(module.in_features)
            span.add_task(torch.randn(4 * module.in_features, module.in_features))
            bases[name] = span.basis(cfg.iuf.projection_energy)
    rule = method.update_rule(cfg.iuf.lr, bases, old_state, 2)
    generator = torch.Generator().manual_seed(cfg.seed)

    def step() -> None:
        method.train_step(rule, tokens, images, labels, {}, generator)

    method.network.train()
    for _ in range(3):
        step()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - started) / args.steps
    print(f"batch {batch}, grid {method.grid}, channels {method.extractor.channels}, threads {torch.get_num_threads()}, "
          f"projected {args.projected}: {seconds:.3f} s/step over {args.steps} steps", flush=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
