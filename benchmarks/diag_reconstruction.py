"""Single-product diagnosis of the reconstruction core on TRAINING data only (issue 12, session 12).

For one product: its normal training images are split (``--heldout`` fraction, seeded) into fit and
validation normals; every validation normal also gets ``--variants`` synthetic defects (a rectangle
of 12-40 px at 224 px: either cut from another fit image of the product, flipped/rotated, and pasted,
or an intensity/colour offset of the region). A ``ReconstructionTransformer`` (no OASA, no SCL, no
continual logic) is trained on the fit images with the given settings; it reports the validation
normals' reconstruction loss and the image AUROC (score = max of the pooled error map, as IUF) and
pixel AUROC of validation normals vs their synthetic defects. No test image is read.

Run: ``python -m benchmarks.diag_reconstruction --product pcb --steps 300 [--neighbor-mask 7 --layerwise] [key=value ...]``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from benchmarks.synthetic_defects import synthetic_defects
from components.config import load_config
from components.data.loading import load_images, train_split
from components.data.manifest import read_dataset
from components.eval.metrics import auroc
from components.methods.reconstruction import (
    ReconstructionTransformer,
    build_feature_extractor,
    error_maps,
    feature_jitter,
    level_normalise,
    pooled_max_scores,
    to_tokens,
    upsample_maps,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-ad"


def auroc_of(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """AUROC with the pipeline's own metric."""
    return auroc(np.asarray(labels), np.asarray(scores))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--product", default="pcb")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--heldout", type=float, default=0.25)
    ap.add_argument("--variants", type=int, default=3)
    ap.add_argument("--neighbor-mask", type=int, default=0)
    ap.add_argument("--layerwise", action="store_true")
    ap.add_argument("--tag", default="")
    ap.add_argument("--standardise", action="store_true")
    ap.add_argument("--level-norm", action="store_true")
    ap.add_argument("--cache", default="runs/diag")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config("params.yaml", ["method=iuf", f"data.root={DATA}", f"data.products={args.product}", *args.overrides])
    rc = cfg.reconstruction
    key = f"{args.product}_s{rc.stride}_st{'-'.join(map(str, rc.stages))}_{cfg.data.image_size}"
    cache = Path(args.cache) / f"{key}.pt"
    torch.manual_seed(0)
    extractor = build_feature_extractor(rc, cfg.backbone)
    grid = extractor.grid_size(cfg.data.image_size)
    if cache.is_file():
        blob = torch.load(cache)
    else:
        manifest = read_dataset(DATA, products=[args.product])
        fit_rows, val_rows = train_split(manifest, [args.product], args.heldout, cfg.seed)
        fit_imgs = load_images(fit_rows["image_path"].tolist(), cfg.data.image_size)
        val_imgs = load_images(val_rows["image_path"].tolist(), cfg.data.image_size)
        syn, syn_masks = synthetic_defects(val_imgs, fit_imgs, args.variants, torch.Generator().manual_seed(1))

        def feats(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([extractor(x[i : i + 16]) for i in range(0, len(x), 16)])

        blob = {"fit": feats(fit_imgs), "val": feats(val_imgs), "syn": feats(syn), "syn_masks": syn_masks, "n_val": len(val_imgs)}
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(blob, cache)
    fit, val, syn = (to_tokens(blob[k]) for k in ("fit", "val", "syn"))
    if args.standardise:
        flat = fit.reshape(-1, fit.shape[-1])
        mu, sd = flat.mean(0), flat.std(0).clamp_min(1e-6)
        fit, val, syn = ((t - mu) / sd for t in (fit, val, syn))
    if args.level_norm:
        fit, val, syn = (level_normalise(t, extractor.level_channels) for t in (fit, val, syn))
    ref_mse = float(((fit - fit.mean(dim=(0, 1))) ** 2).mean())
    torch.manual_seed(cfg.seed)
    net = ReconstructionTransformer(fit.shape[-1], grid, rc, neighbor_mask=args.neighbor_mask, layerwise_queries=args.layerwise)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(cfg.seed)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    losses = []
    net.train()
    step = 0
    while step < args.steps:
        order = torch.randperm(len(fit), generator=gen)
        for s in range(0, len(fit) - args.batch + 1, args.batch):
            b = fit[order[s : s + args.batch]]
            recon, _ = net(feature_jitter(b, rc.jitter_scale, gen))
            loss = F.mse_loss(recon, b)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            if step >= args.steps:
                break
    cpu = time.process_time() - cpu0
    net.eval()
    with torch.no_grad():
        def reconstruct(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([net(t[i : i + 32])[0] for i in range(0, len(t), 32)])

        val_recon = reconstruct(val)  # once: error maps and the validation loss
        mv, ms = error_maps(val_recon, val, grid), error_maps(reconstruct(syn), syn, grid)
        val_loss = float(F.mse_loss(val_recon, val))
        size = (cfg.data.image_size, cfg.data.image_size)
        uv, us = upsample_maps(mv, size, 0.0), upsample_maps(ms, size, 0.0)
        sv, ss = pooled_max_scores(uv, cfg.iuf.score_pool), pooled_max_scores(us, cfg.iuf.score_pool)
        img_auc = auroc_of([0] * len(sv) + [1] * len(ss), torch.cat([sv, ss]).numpy())
        # pixel AUROC over synthetic images (masks) + normal images (all zero)
        pix_scores = torch.cat([upsample_maps(mv, size, cfg.iuf.smoothing_sigma).flatten(), upsample_maps(ms, size, cfg.iuf.smoothing_sigma).flatten()])
        pix_labels = torch.cat([torch.zeros(uv.numel()), blob["syn_masks"].flatten().float()])
        sub = torch.arange(0, len(pix_labels), 7)
        pix_auc = auroc_of(pix_labels[sub].numpy(), pix_scores[sub].numpy())
    res = {"product": args.product, "tag": args.tag, "steps": args.steps, "lr": args.lr, "neighbor_mask": args.neighbor_mask, "layerwise": args.layerwise,
           "overrides": args.overrides, "standardise": args.standardise, "level_norm": args.level_norm, "ref_mse": round(ref_mse, 3),
           "curve": [round(sum(losses[i : i + 20]) / len(losses[i : i + 20]), 3) for i in range(0, len(losses), max(20, len(losses) // 8))],
           "train_loss_last20": sum(losses[-20:]) / len(losses[-20:]), "val_loss": val_loss,
           "syn_img_auroc": round(img_auc, 4), "syn_pix_auroc": round(pix_auc, 4), "fit_cpu_s": round(cpu, 1), "fit_wall_s": round(time.perf_counter() - wall0, 1),
           "n_fit": len(fit), "n_val": blob["n_val"], "n_syn": len(syn)}
    print(json.dumps(res), flush=True)
    with open(Path(args.cache) / "results.jsonl", "a") as fh:
        fh.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
