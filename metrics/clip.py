"""CLIP ViT-B/32 image embeddings for CLIP-FID (paper appendix D; Kynkäänniemi et al. 2023), following
clean-fid's `clip_vit_b_32` feature extractor exactly:

1. each uint8 image → PIL RGB → `torchvision.transforms.Resize(224, BICUBIC)` (PIL's bicubic on the
   shorter side, so the result is re-quantised to uint8) → `CenterCrop(224)`;
2. x / 255, normalised with CLIP's mean (0.48145466, 0.4578275, 0.40821073) and std (0.26862954,
   0.26130258, 0.27577711);
3. OpenAI's `encode_image`: the 512-d image embedding = ln_post(CLS token) @ proj, not L2-normalised.

The network is timm's `vit_base_patch32_clip_224` with QuickGELU (OpenAI's activation; timm's plain
`.openai` config uses GELU) and a 512-way bias-free head standing for `proj`. Weights: metrics/vit_weights.py
(OpenAI's `ViT-B-32.pt`, an OpenAI/open_clip state dict, or timm's)."""
import numpy as np
import PIL.Image
import torch
from torch import nn

from metrics.vit_weights import load_converted, resolve_state_dict, state_fingerprint

RESOLUTION = 224
EMBED_DIM = 512
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
TIMM_NAME = 'vit_base_patch32_clip_224.openai'  # the download (weights only; the activation is set below)
VERSION = 'clip-vit-b-32/cleanfid-v1: PIL bicubic shorter side 224, centre crop, CLIP mean/std, image projection'


def resize_like_cleanfid(images):
    """uint8 [N, 1|3, H, W] → uint8 [N, 3, 224, 224]: torchvision Resize(224, BICUBIC) + CenterCrop(224)
    on PIL images (shorter side to 224, longer side int(224·long/short); crop offsets rounded)."""
    out = []
    for image in images.cpu().numpy():
        pil = PIL.Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).convert('RGB')
        w, h = pil.size
        short, long = min(w, h), max(w, h)
        size_long = int(RESOLUTION * long / short)
        size = (RESOLUTION, size_long) if w <= h else (size_long, RESOLUTION)
        pil = pil.resize(size, PIL.Image.Resampling.BICUBIC)
        left, top = int(round((size[0] - RESOLUTION) / 2)), int(round((size[1] - RESOLUTION) / 2))
        pil = pil.crop((left, top, left + RESOLUTION, top + RESOLUTION))
        out.append(np.asarray(pil).transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out)).to(images.device)


class CLIPImageEncoder(nn.Module):
    """`forward(uint8 [N, C, H, W])` → float32 [N, 512] CLIP image embeddings (module doc)."""
    version = VERSION

    def __init__(self, **model_kwargs):
        super().__init__()
        import timm
        model_kwargs = dict(dict(num_classes=EMBED_DIM, act_layer='quick_gelu'), **model_kwargs)
        self.net = timm.create_model('vit_base_patch32_clip_224', pretrained=False, **model_kwargs)
        self.num_features = self.net.num_classes
        self.register_buffer('mean', torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(STD).view(1, 3, 1, 1), persistent=False)
        self.weights_id = None

    def forward(self, images):
        x = resize_like_cleanfid(images).to(self.mean.device, torch.float32) / 255
        with torch.autocast(x.device.type, enabled=False):
            return self.net((x - self.mean) / self.std).float()


def load_clip(weights=None, device='cpu', state=None, **model_kwargs):
    """The CLIP-FID image encoder (eval mode, frozen) from `state` (a state dict, tests), `weights`
    (PATH|URL, `--clip-weights`) or timm's download; `model_kwargs` shrink it for tests."""
    label = weights or TIMM_NAME
    if state is None:
        state = resolve_state_dict(weights, 'CLIP ViT-B/32', '--clip-weights', timm_name=TIMM_NAME)
    encoder = CLIPImageEncoder(**model_kwargs)
    load_converted(encoder.net, state, label, 'CLIP ViT-B/32')
    encoder.weights_id = state_fingerprint(encoder.net)
    return encoder.eval().requires_grad_(False).to(device)
