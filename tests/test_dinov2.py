"""metrics/dinov2.py: FD-DINOv2's extractor equals the library's ViT forward on EDM2's preprocessing, with
the position embedding resampled exactly as the torch.hub DINOv2 model does (checked by hand-made bicubic)."""
import numpy as np
import pytest
import timm
import torch
from torch.nn import functional as F

from metrics import dinov2

TINY = dict(embed_dim=64, depth=2, num_heads=2)


def hub_layout_state(seed=0):
    """Random weights in Meta's DINOv2 layout: timm's names plus `mask_token`, a 37×37 (518²) pos_embed."""
    torch.manual_seed(seed)
    net = timm.create_model('vit_large_patch14_dinov2', pretrained=False, num_classes=0, img_size=518, **TINY)
    state = {k: v + 0.02 * torch.randn_like(v) for k, v in net.state_dict().items()}  # also perturb ls gammas
    state['mask_token'] = torch.zeros(1, TINY['embed_dim'])
    return state


def cubic_weights(x, a=-0.75):
    """Keys' cubic convolution kernel, PyTorch's bicubic coefficient (A = −0.75)."""
    x = abs(x)
    if x <= 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def hub_resample_matrix(size_in, size_out, offset=0.1):
    """[out, in] bicubic sampling of DINOv2's interpolate_pos_encoding: scale factor s = (out + offset) / in,
    output j reads input coordinate (j + ½)/s − ½, border pixels repeated."""
    s = (size_out + offset) / size_in
    matrix = np.zeros((size_out, size_in))
    for j in range(size_out):
        src = (j + 0.5) / s - 0.5
        base = int(np.floor(src))
        for tap in range(-1, 3):
            matrix[j, min(max(base + tap, 0), size_in - 1)] += cubic_weights(src - (base + tap))
    return matrix


def test_position_embedding_resampled_like_the_hub_model():
    pos = torch.randn(1, 1 + 37 * 37, 8, generator=torch.Generator().manual_seed(0))  # float32, as the hub
    out = dinov2.hub_resampled_pos_embed(pos, 16)
    w = torch.from_numpy(hub_resample_matrix(37, 16))
    table = pos[0, 1:].reshape(37, 37, 8).double()
    expected = torch.einsum('ij,jkc,lk->ilc', w, table, w).reshape(256, 8)
    assert out.shape == (1, 257, 8) and torch.equal(out[0, 0], pos[0, 0])
    assert torch.allclose(out[0, 1:].double(), expected, atol=1e-4)  # float32 rounding: ≤ 1.5e-5 over 300 draws
    plain = F.interpolate(table.permute(2, 0, 1)[None], size=(16, 16), mode='bicubic', antialias=True)
    assert (plain[0].permute(1, 2, 0).reshape(256, 8) - expected).abs().max() > 1e-2  # timm's resampling differs
    assert dinov2.hub_resampled_pos_embed(pos, 37) is pos  # the native grid is not resampled


def test_extractor_equals_the_library_forward_on_edm2_preprocessing(tmp_path):
    state = hub_layout_state()
    path = tmp_path / 'dinov2_vitl14_pretrain.pth'
    torch.save(state, path)
    encoder = dinov2.load_dinov2(str(path), **TINY)
    reference = timm.create_model('vit_large_patch14_dinov2', pretrained=False, num_classes=0, img_size=224,
                                  **TINY).eval()
    ref_state = {k: v for k, v in state.items() if k != 'mask_token'}
    ref_state['pos_embed'] = dinov2.hub_resampled_pos_embed(state['pos_embed'], 16)
    reference.load_state_dict(ref_state)
    images = torch.randint(0, 256, (3, 1, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    x = F.interpolate(images.float().expand(-1, 3, -1, -1), size=(224, 224), mode='bicubic', antialias=True)
    x = (x / 255 - torch.tensor(dinov2.MEAN).view(1, 3, 1, 1)) / torch.tensor(dinov2.STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ours, theirs = encoder(images), reference(x)
    assert ours.shape == (3, 64) and theirs.std() > 0.1
    assert torch.equal(ours, theirs)  # CLS token after the final norm (num_classes=0, token pooling)
    # the same features from a 518² input to the unresampled table: the library's own positional path
    native = timm.create_model('vit_large_patch14_dinov2', pretrained=False, num_classes=0, img_size=518, **TINY)
    native.load_state_dict({k: v for k, v in state.items() if k != 'mask_token'})
    big = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(native.eval()(big), native.forward_features(big)[:, 0], atol=1e-6)


def test_foreign_weights_are_a_clear_error(tmp_path):
    path = tmp_path / 'clip.pt'
    torch.save({'visual.proj': torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match=r'clip\.pt: not DINOv2 ViT-L/14 weights'):
        dinov2.load_dinov2(str(path), **TINY)
