"""Train the ``shapes`` model on this CPU: a small latent diffusion model that draws what its prompt says.

    python -m pocketsd.shapes.train --out shapes/model          # `make train-tiny`: the committed weights

Three stages, each seeded, written as one standard diffusers folder (``StableDiffusionPipeline.from_pretrained``
loads it) completely or not at all:
1. a CLIP-style tokenizer whose merges are learned on the captions (every word one token);
2. an ``AutoencoderKL`` that halves the picture twice (64² RGB to 16² × 4 latents), trained on drawn scenes with an L1
   reconstruction loss that weighs the shape's pixels 10× (``_shape_weights``) and a small KL term; its
   ``scaling_factor`` is then set so the training latents have unit standard deviation, as SD's 0.18215 does for
   SD's VAE;
3. a ``CLIPTextModel`` (token embeddings drawn at std 1, not CLIP's 0.02) and a ``UNet2DConditionModel`` trained
   together from scratch with the usual noise-prediction
   loss (epsilon, SD's scaled-linear schedule of 1,000 steps), weighted by min-SNR-5 (Hang et al. 2023: the same
   quality in far fewer steps), with 10 % of captions dropped to "" so classifier-free guidance works. The latents
   of a fixed pool of drawn scenes are encoded once; the saved weights are an exponential moving average.
diffusers and transformers build, save and load the modules; this file only runs their training loops, which no
library here does for a from-scratch text-to-image model on a CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pocketsd.shapes.scenes import BACKGROUNDS, IMAGE_SIZE, all_scenes, draw_batch, sample_scenes
from pocketsd.staging import staged_folder

log = logging.getLogger(__name__)

TEXT_LENGTH = 16  # tokens, bos and eos included; the longest caption takes 11
VOCAB_SIZE = 640  # CLIP's layout: 514 byte symbols and specials, the caption words' merges, placeholders
DROP_CAPTION = 0.1
MIN_SNR_GAMMA = 5.0
FOREGROUND_WEIGHT = 10.0
TOKEN_EMBEDDING_STD = 1.0

VAE_CONFIG = {"sample_size": IMAGE_SIZE, "in_channels": 3, "out_channels": 3, "latent_channels": 4,
              "layers_per_block": 1, "block_out_channels": [16, 32, 64], "norm_num_groups": 8,
              "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3}
TEXT_ENCODER_CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "max_position_embeddings": TEXT_LENGTH, "vocab_size": VOCAB_SIZE, "projection_dim": 64,
                       "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
UNET_CONFIG = {"sample_size": IMAGE_SIZE // 4, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
               "block_out_channels": [32, 64, 128],
               "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
               "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "cross_attention_dim": 64,
               "attention_head_dim": 4, "norm_num_groups": 32}
SCHEDULER_CONFIG = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                    "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
                    "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "timestep_spacing": "leading"}
# The shipped sampler: DPM-Solver++(2M) on the training schedule. Over the first 120 prompts of the quality bench
# (20 steps, guidance 7.5, the previous weights) PNDM, SD 1.5's default, drew 75 % of them right and DDIM, Euler and
# DPM++ 2M 87-88 %; PNDM's misses are mostly colours (the asked colour in 85 % of pictures, DPM++ 2M 95 %).
SAMPLER_CONFIG = {"_class_name": "DPMSolverMultistepScheduler", **{
    key: value for key, value in SCHEDULER_CONFIG.items() if key not in ("skip_prk_steps", "set_alpha_to_one")}}


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    threads: int = 2
    vae_steps: int = 1000
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl: float = 1e-5
    pool: int = 24000  # drawn scenes whose latents the UNet trains on
    unet_steps: int = 4700
    unet_batch: int = 64
    unet_lr: float = 5e-4
    warmup: int = 200
    ema: float = 0.999


QUICK = TrainConfig(vae_steps=3, vae_batch=4, pool=16, unet_steps=3, unet_batch=4, warmup=1)  # the test's


def captions_corpus() -> list[str]:
    """Every caption, each once: what the tokenizer's merges are learned on."""
    return [scene.caption for scene in all_scenes()]


def _images(scenes: list, seed: int) -> Any:
    import torch

    pixels = torch.from_numpy(draw_batch(scenes, seed)).permute(0, 3, 1, 2).float()
    return pixels / 127.5 - 1.0


def _shape_weights(scenes: list, images: Any) -> Any:
    """Per-pixel loss weights: FOREGROUND_WEIGHT on the shape, 1 on the background. The shape is 5-12 % of a
    picture; unweighted, the VAE settles on a perfect background and one blurred blob of the mean shape colour."""
    import torch

    backgrounds = torch.tensor([BACKGROUNDS[s.background] for s in scenes], dtype=torch.float32) / 127.5 - 1.0
    shape = (images - backgrounds[:, :, None, None]).abs().amax(dim=1, keepdim=True) > 0.02
    return 1.0 + (FOREGROUND_WEIGHT - 1.0) * shape.float()


def train_vae(config: TrainConfig, progress: bool) -> Any:
    import diffusers
    import torch
    from tqdm import tqdm

    torch.manual_seed(config.seed)
    vae = diffusers.AutoencoderKL(**VAE_CONFIG)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.vae_lr, total_steps=config.vae_steps,
                                                   pct_start=min(0.3, config.warmup / config.vae_steps))
    bar = tqdm(range(config.vae_steps), desc="vae", disable=not progress)
    for step in bar:
        scenes = sample_scenes(config.vae_batch, seed=config.seed * 1_000_003 + step)
        x = _images(scenes, seed=step)
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        error = (_shape_weights(scenes, x) * (reconstruction - x).abs()).mean()
        loss = error + config.vae_kl * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return vae.eval()


def encode_pool(vae: Any, config: TrainConfig) -> tuple[Any, list[str], float]:
    """The pool's latent means and captions, and the VAE's scaling factor (1 / their standard deviation)."""
    import torch

    scenes = sample_scenes(config.pool, seed=config.seed + 7)
    means = []
    with torch.inference_mode():
        for start in range(0, config.pool, 256):
            batch = scenes[start:start + 256]
            means.append(vae.encode(_images(batch, seed=config.seed + 11 + start)).latent_dist.mean)
    latents = torch.cat(means)
    scale = 1.0 / float(latents.std())
    return latents * scale, [s.caption for s in scenes], scale


def train_unet(latents: Any, captions: list[str], tokenizer: Any, config: TrainConfig,
               progress: bool) -> tuple[Any, Any]:
    import copy

    import diffusers
    import torch
    from tqdm import tqdm
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(config.seed + 1)
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG, **special))
    # CLIP initialises token embeddings at std 0.02, so words start nearly alike, and the words that separate least
    # in the loss stay so: trained that way, "left" and "right" ended 0.9 apart at the text encoder's output
    # (colours 10), and the UNet never learned where to draw. At std 1 every word is distinct from the first step.
    torch.nn.init.normal_(text_encoder.get_input_embeddings().weight, std=TOKEN_EMBEDDING_STD)
    unet = diffusers.UNet2DConditionModel(**UNET_CONFIG)
    scheduler = diffusers.DDPMScheduler.from_config(SCHEDULER_CONFIG)
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    weights = torch.clamp(snr, max=MIN_SNR_GAMMA) / snr  # min-SNR-γ for epsilon prediction

    def ids(texts: list[str]) -> Any:
        return tokenizer(texts, padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                         return_tensors="pt").input_ids

    caption_ids, empty_ids = ids(captions), ids([""])
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.unet_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / config.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / config.unet_steps))))
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    generator = torch.Generator().manual_seed(config.seed + 2)
    bar = tqdm(range(config.unet_steps), desc="unet + text encoder", disable=not progress)
    for _ in bar:
        pick = torch.randint(0, len(latents), (config.unet_batch,), generator=generator)
        x0, tokens = latents[pick], caption_ids[pick].clone()
        dropped = torch.rand(config.unet_batch, generator=generator) < DROP_CAPTION
        tokens[dropped] = empty_ids
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (config.unet_batch,), generator=generator)
        noisy = scheduler.add_noise(x0, noise, t)
        states = text_encoder(tokens).last_hidden_state
        predicted = unet(noisy, t, encoder_hidden_states=states).sample
        loss = (weights[t] * ((predicted - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                for e, p in zip(ema.parameters(), live.parameters()):
                    e.lerp_(p, 1 - config.ema)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return ema_unet.eval(), ema_text.eval()


def train(out_dir: str | Path, config: TrainConfig = TrainConfig(), progress: bool = True) -> Path:
    """Train every part and write the diffusers folder to ``out_dir`` (which must not exist or be empty)."""
    import diffusers
    import torch
    import transformers
    from transformers import CLIPTokenizer

    from pocketsd.export.random_model import model_index
    from pocketsd.export.tokenizer_files import write_clip_tokenizer

    torch.set_num_threads(config.threads)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    with staged_folder(out_dir, "model") as staging:
        write_clip_tokenizer(staging / "tokenizer", VOCAB_SIZE, model_max_length=TEXT_LENGTH,
                             corpus=captions_corpus())
        tokenizer = CLIPTokenizer.from_pretrained(staging / "tokenizer")
        vae = train_vae(config, progress)
        latents, captions, scale = encode_pool(vae, config)
        vae.register_to_config(scaling_factor=scale)
        unet, text_encoder = train_unet(latents, captions, tokenizer, config, progress)
        vae.save_pretrained(staging / "vae", safe_serialization=True)
        unet.save_pretrained(staging / "unet", safe_serialization=True)
        text_encoder.save_pretrained(staging / "text_encoder", safe_serialization=True)
        sampler = SAMPLER_CONFIG["_class_name"]
        getattr(diffusers, sampler).from_config(SAMPLER_CONFIG).save_pretrained(staging / "scheduler")
        index = model_index(diffusers.__version__, sampler, "StableDiffusionPipeline", model_configs())
        (staging / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        (staging / "training.json").write_text(json.dumps(
            {"command": "make train-tiny", "config": asdict(config), "seconds": round(time.perf_counter() - started),
             "torch": torch.__version__, "diffusers": diffusers.__version__,
             "transformers": transformers.__version__}, indent=2) + "\n")
    return Path(out_dir)


def model_configs() -> Any:
    """The shapes model's configs as ``random_model`` takes them (the shipped sampler's, not the training's)."""
    from pocketsd.export.random_model import ModelConfigs

    return ModelConfigs(UNET_CONFIG, VAE_CONFIG, TEXT_ENCODER_CONFIG, SAMPLER_CONFIG, arch="shapes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pocketsd.shapes.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write the diffusers model to (new or empty)")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--vae-steps", type=int, default=TrainConfig.vae_steps)
    parser.add_argument("--unet-steps", type=int, default=TrainConfig.unet_steps)
    parser.add_argument("--threads", type=int, default=TrainConfig.threads)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = replace(TrainConfig(), seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                     threads=args.threads)
    path = train(args.out, config, progress=not args.quiet)
    log.info("wrote the shapes model to %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
