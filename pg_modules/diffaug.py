"""DiffAugment, policy 'color,translation,cutout' (Zhao et al. 2020; docs/method.md §10).

Applied to images in [−1, 1] before the frozen feature networks, independently per backbone. Randomness comes
from torch's default generator of the input's device, so the training loop's RNG-state capture covers it."""
import torch
import torch.nn.functional as F


def diff_augment(x, translation_ratio=0.125, cutout_ratio=0.2):
    batch, _, height, width = x.shape
    u = lambda: torch.rand(batch, 1, 1, 1, dtype=x.dtype, device=x.device)  # noqa: E731
    x = x + (u() - 0.5)                                                   # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (u() * 2) + mean                                     # saturation
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    x = (x - mean) * (u() + 0.5) + mean                                   # contrast

    # Translation by whole pixels, at most round(ratio·size) each way, zero fill.
    rows = torch.arange(height, device=x.device).view(1, -1, 1)
    cols = torch.arange(width, device=x.device).view(1, 1, -1)
    pad_y, pad_x = int(height * translation_ratio + 0.5), int(width * translation_ratio + 0.5)
    shift_y = torch.randint(-pad_y, pad_y + 1, [batch, 1, 1], device=x.device)
    shift_x = torch.randint(-pad_x, pad_x + 1, [batch, 1, 1], device=x.device)
    padded = F.pad(x, [pad_x, pad_x, pad_y, pad_y]).permute(0, 2, 3, 1)  # NHWC for gathering pixels
    index = torch.arange(batch, device=x.device).view(-1, 1, 1)
    x = padded[index, rows - shift_y + pad_y, cols - shift_x + pad_x].permute(0, 3, 1, 2)

    # Cutout: zero a round(ratio·size) square at a uniform position (clipped at the border).
    size_y, size_x = int(height * cutout_ratio + 0.5), int(width * cutout_ratio + 0.5)
    top = torch.randint(0, height, [batch, 1, 1], device=x.device) - size_y // 2
    left = torch.randint(0, width, [batch, 1, 1], device=x.device) - size_x // 2
    inside = (rows >= top) & (rows < top + size_y) & (cols >= left) & (cols < left + size_x)
    return x * (~inside).unsqueeze(1).to(x.dtype)
