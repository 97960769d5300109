"""Single-product diagnosis of the reconstruction core on TRAINING data only (issue 12, session 12).

For one product: its normal training images are split (``--heldout`` fraction, seeded) into fit and
validation normals; every validation normal also gets ``--variants`` synthetic defects (a rectangle
of 12-40 px at 224 px: either cut from another fit image of the product, flipped/rotated, and pasted,
or an intensity/colour offset of the region). A ``ReconstructionTransformer`` (no OASA, no SCL, no
continual logic) is trained on the fit images with the given settings; it reports the validation
normals' reconstruction loss and the image AUROC (score = max of the pooled error map, as IUF) and
pixel AUROC of validation normals vs their synthetic defects. No test image is read.

Session 14 additions: ``--defects lines`` (thin strokes, ``synthetic_defects.line_defects``) instead of
rectangles; ``--tiles T`` (images loaded at T x ``data.image_size`` and cut into T x T tiles of
``data.image_size``, image score = max over its tiles); every run reports the image / pixel AUROC of
several error maps of the same trained network (``img_pix_by_score``: ``l2`` = IUF's map, ``chan`` =
per-channel error standardised by the fit normals' error, ``cos`` = 1 - cosine per pyramid level,
``pos`` / ``posmean`` / ``posdiv`` = the map z-scored / minus / divided by the fit normals' per-position
mean error) and ``normal_top_on_border``: the share of validation normals whose worst token is on the
grid's border ring.

Run: ``python -m benchmarks.diag_reconstruction --product pcb --steps 300 [--neighbor-mask 7 --layerwise] [--defects lines] [--tiles 2] [key=value ...]``
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

from components.data.synthetic.pasted import line_defects, synthetic_defects
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


def to_tiles(x: torch.Tensor, tiles: int) -> torch.Tensor:
    """(B, C, T*s, T*s) -> (B*T*T, C, s, s): non-overlapping tiles, image-major."""
    b, c, h, w = x.shape
    s = h // tiles
    return x.reshape(b, c, tiles, s, tiles, s).permute(0, 2, 4, 1, 3, 5).reshape(b * tiles * tiles, c, s, s)


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
    ap.add_argument("--tiles", type=int, default=1, help="tiles per side: images loaded at tiles x data.image_size and cut into tiles of data.image_size")
    ap.add_argument("--defects", choices=["rectangles", "lines"], default="rectangles")
    ap.add_argument("--cache", default="runs/diag")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config("params.yaml", ["method=iuf", f"data.root={DATA}", f"data.products={args.product}", *args.overrides])
    rc = cfg.reconstruction
    key = f"{args.product}_{args.defects}_t{args.tiles}_s{rc.stride}_st{'-'.join(map(str, rc.stages))}_{cfg.data.image_size}"
    cache = Path(args.cache) / f"{key}.pt"
    torch.manual_seed(0)
    extractor = build_feature_extractor(rc, cfg.backbone)
    grid = extractor.grid_size(cfg.data.image_size)
    if cache.is_file():
        blob = torch.load(cache)
    else:
        manifest = read_dataset(DATA, products=[args.product])
        fit_rows, val_rows = train_split(manifest, [args.product], args.heldout, cfg.seed)
        size_in = args.tiles * cfg.data.image_size
        fit_imgs = load_images(fit_rows["image_path"].tolist(), size_in)
        val_imgs = load_images(val_rows["image_path"].tolist(), size_in)
        gen1 = torch.Generator().manual_seed(1)
        syn, syn_masks = synthetic_defects(val_imgs, fit_imgs, args.variants, gen1) if args.defects == "rectangles" else line_defects(val_imgs, args.variants, gen1)

        def feats(x: torch.Tensor) -> torch.Tensor:
            x = to_tiles(x, args.tiles)
            return torch.cat([extractor(x[i : i + 16]) for i in range(0, len(x), 16)])

        blob = {"fit": feats(fit_imgs), "val": feats(val_imgs), "syn": feats(syn), "syn_masks": to_tiles(syn_masks[:, None], args.tiles)[:, 0], "n_val": len(val_imgs)}
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

        val_recon, syn_recon = reconstruct(val), reconstruct(syn)
        val_loss = float(F.mse_loss(val_recon, val))
        size = (cfg.data.image_size, cfg.data.image_size)
        fit_err2 = ((reconstruct(fit) - fit) ** 2).reshape(-1, fit.shape[-1]).mean(0).clamp_min(1e-8)  # per-channel MSE of the fit normals

        fit_maps = error_maps(reconstruct(fit), fit, grid)
        pos_mean, pos_std = fit_maps.mean(0), fit_maps.std(0).clamp_min(1e-6)  # per-position error statistics of the fit normals

        def variant_maps(recon: torch.Tensor, target: torch.Tensor, variant: str) -> torch.Tensor:
            if variant == "pos":  # z-score per grid position
                return (error_maps(recon, target, grid) - pos_mean) / pos_std
            if variant == "posmean":  # minus the position's mean error
                return error_maps(recon, target, grid) - pos_mean
            if variant == "posdiv":  # over the position's mean error
                return error_maps(recon, target, grid) / pos_mean.clamp_min(1e-6)
            if variant == "l2":
                return error_maps(recon, target, grid)
            if variant == "chan":  # per-channel error standardised by the training normals' error
                return ((recon - target) ** 2 / fit_err2).sum(-1).sqrt().reshape(len(target), *grid)
            parts = zip(recon.split(extractor.level_channels, -1), target.split(extractor.level_channels, -1))  # "cos": 1 - cosine per level, summed
            return sum(1 - F.cosine_similarity(r, t, dim=-1) for r, t in parts).reshape(len(target), *grid)

        aurocs = {}
        for variant in ("l2", "chan", "cos", "pos", "posmean", "posdiv"):
            mv, ms = variant_maps(val_recon, val, variant), variant_maps(syn_recon, syn, variant)
            uv, us = upsample_maps(mv, size, 0.0), upsample_maps(ms, size, 0.0)
            sv, ss = (pooled_max_scores(u, cfg.iuf.score_pool).reshape(-1, args.tiles**2).max(1).values for u in (uv, us))  # max over an image's tiles
            img_auc = auroc_of([0] * len(sv) + [1] * len(ss), torch.cat([sv, ss]).numpy())
            # pixel AUROC over synthetic images (masks) + normal images (all zero)
            pix_scores = torch.cat([upsample_maps(mv, size, cfg.iuf.smoothing_sigma).flatten(), upsample_maps(ms, size, cfg.iuf.smoothing_sigma).flatten()])
            pix_labels = torch.cat([torch.zeros(uv.numel()), blob["syn_masks"].flatten().float()])
            sub = torch.arange(0, len(pix_labels), 7)
            aurocs[variant] = (round(img_auc, 4), round(auroc_of(pix_labels[sub].numpy(), pix_scores[sub].numpy()), 4))
        img_auc, pix_auc = aurocs["l2"]
        ring = torch.ones(grid, dtype=torch.bool)
        ring[1:-1, 1:-1] = False
        top = error_maps(val_recon, val, grid).flatten(1).argmax(1)
        border_top = float(ring.flatten()[top].float().mean())  # share of validation normals whose worst token is on the border ring
    res = {"product": args.product, "tag": args.tag, "steps": args.steps, "lr": args.lr, "neighbor_mask": args.neighbor_mask, "layerwise": args.layerwise,
           "overrides": args.overrides, "standardise": args.standardise, "level_norm": args.level_norm, "ref_mse": round(ref_mse, 3),
           "curve": [round(sum(losses[i : i + 20]) / len(losses[i : i + 20]), 3) for i in range(0, len(losses), max(20, len(losses) // 8))],
           "train_loss_last20": sum(losses[-20:]) / len(losses[-20:]), "val_loss": val_loss,
           "defects": args.defects, "tiles": args.tiles, "syn_img_auroc": img_auc, "syn_pix_auroc": pix_auc, "img_pix_by_score": aurocs, "normal_top_on_border": round(border_top, 3), "fit_cpu_s": round(cpu, 1), "fit_wall_s": round(time.perf_counter() - wall0, 1),
           "n_fit": len(fit), "n_val": blob["n_val"], "n_syn": len(syn)}
    print(json.dumps(res), flush=True)
    with open(Path(args.cache) / "results.jsonl", "a") as fh:
        fh.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
