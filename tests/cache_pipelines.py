"""Tiny, randomly initialised diffusers pipelines for the caching tests (no downloads): DDPM (UNet2DModel),
Stable Diffusion (UNet2DConditionModel), DiT, PixArt-alpha, SD3 and Flux, with text encoders from `transformers`
at tiny sizes and a word-level tokenizer built in memory.

Each builder returns (pipe, call): call(**overrides) is the keyword set for one pipeline run, with fixed latents
so that runs are comparable, and per-sample latents that can be sliced (`call(batch=1, index=b)` is sample b of
the batch alone)."""
import torch
from torch import nn

WORDS = ["<pad>", "<unk>", "</s>", "<s>", "a", "photo", "of", "cat", "dog", "red", "blue", "car", "tree", "blurry"]
STEPS = 3


def tokenizer(max_length: int = 8):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                   bos_token="<s>", model_max_length=max_length)


def clip(hidden=16, projection=False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(WORDS), hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=8, projection_dim=hidden, bos_token_id=3,
                         eos_token_id=2, pad_token_id=0)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def t5(d_model=16):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=len(WORDS), d_model=d_model, d_ff=d_model, d_kv=8, num_layers=1, num_heads=2,
                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


def vae(latent_channels=4):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, sample_size=8).eval()


def _jitter(model: nn.Module, std=0.05):
    """Random weights everywhere: diffusers zero-initialises gates and output projections, which would hide the
    effect of any cache."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model.eval()


def _latents(batch, channels, size, seed=1):
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _slice(x, index):
    return x if index is None else x[index:index + 1]


def ddpm():
    from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

    torch.manual_seed(0)
    unet = _jitter(UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                               block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=8,
                               down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                               up_block_types=("AttnUpBlock2D", "UpBlock2D")))
    pipe = DDPMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)

    def call(batch=2, index=None, steps=STEPS):
        seeds = list(range(batch)) if index is None else [index]
        return dict(batch_size=len(seeds), num_inference_steps=steps, output_type="np",
                    generator=[torch.Generator().manual_seed(s) for s in seeds])

    return pipe, call


def stable_diffusion():
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = _jitter(UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                        block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16,
                                        attention_head_dim=4,
                                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")))
    pipe = StableDiffusionPipeline(vae=vae(), text_encoder=clip(), tokenizer=tokenizer(), unet=unet,
                                   scheduler=DDIMScheduler(num_train_timesteps=1000), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompts, latents = ["a photo of a cat", "a red car"], _latents(2, 4, 8)

    def call(batch=2, index=None, steps=STEPS):
        sel = prompts if index is None else prompts[index:index + 1]
        return dict(prompt=sel, negative_prompt=["blurry"] * len(sel), num_inference_steps=steps,
                    guidance_scale=3.0, height=8, width=8, latents=_slice(latents, index), output_type="latent")

    return pipe, call


def dit():
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = _jitter(DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                out_channels=4, num_layers=2, sample_size=8, patch_size=2,
                                                num_embeds_ada_norm=1000, norm_num_groups=1))
    pipe = DiTPipeline(transformer=transformer, vae=vae(), scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)

    def call(batch=2, index=None, steps=STEPS):
        seeds = [0, 1] if index is None else [index]  # DiTPipeline takes no latents: one generator per sample
        return dict(class_labels=[[1, 7][s] for s in seeds], guidance_scale=3.0, num_inference_steps=steps,
                    generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="latent")

    return pipe, call


def pixart():
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = _jitter(PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                   out_channels=4, num_layers=2, sample_size=8, patch_size=2,
                                                   cross_attention_dim=16, caption_channels=16,
                                                   use_additional_conditions=False))
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer(), text_encoder=t5(16), vae=vae(), transformer=transformer,
                               scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    prompts, latents = ["a photo of a cat", "a red car"], _latents(2, 4, 8)

    def call(batch=2, index=None, steps=STEPS):
        sel = prompts if index is None else prompts[index:index + 1]
        return dict(prompt=sel, num_inference_steps=steps, guidance_scale=3.0, height=8, width=8,
                    latents=_slice(latents, index), output_type="latent", use_resolution_binning=False,
                    clean_caption=False, max_sequence_length=8)

    return pipe, call


def sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = _jitter(SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                                attention_head_dim=8, num_attention_heads=2,
                                                caption_projection_dim=16, joint_attention_dim=32,
                                                pooled_projection_dim=32, out_channels=4))
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=vae(), text_encoder=clip(projection=True), tokenizer=tokenizer(),
                                    text_encoder_2=clip(projection=True), tokenizer_2=tokenizer(),
                                    text_encoder_3=t5(32), tokenizer_3=tokenizer())
    pipe.set_progress_bar_config(disable=True)
    prompts, latents = ["a photo of a cat", "a red car"], _latents(2, 4, 8)

    def call(batch=2, index=None, steps=STEPS):
        sel = prompts if index is None else prompts[index:index + 1]
        return dict(prompt=sel, num_inference_steps=steps, guidance_scale=3.0, height=8, width=8,
                    latents=_slice(latents, index), output_type="latent", max_sequence_length=8)

    return pipe, call


def flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = _jitter(FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                                 pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae(), text_encoder=clip(),
                        tokenizer=tokenizer(), text_encoder_2=t5(16), tokenizer_2=tokenizer(),
                        transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a photo of a cat", "a red car"]
    latents = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(1))  # packed: (B, tokens, 16)

    def call(batch=2, index=None, steps=STEPS, true_cfg=True):
        sel = prompts if index is None else prompts[index:index + 1]
        extra = dict(negative_prompt=["blurry"] * len(sel), true_cfg_scale=2.0) if true_cfg else {}
        return dict(prompt=sel, num_inference_steps=steps, guidance_scale=3.0, height=8, width=8,
                    latents=latents if index is None else latents[index:index + 1], output_type="latent",
                    max_sequence_length=8, **extra)

    return pipe, call


BUILDERS = {"ddpm": ddpm, "sd": stable_diffusion, "dit": dit, "pixart": pixart, "sd3": sd3, "flux": flux}
