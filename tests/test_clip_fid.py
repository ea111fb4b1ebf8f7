"""metrics/clip.py: CLIP-FID's extractor equals an independent forward pass of OpenAI's image encoder on
clean-fid's preprocessing, for weights in OpenAI's layout (mapped by timm) and in timm's own."""
import numpy as np
import PIL.Image
import pytest
import timm
import torch
import torchvision.transforms as T
from torch.nn import functional as F

from metrics import clip
from metrics.vit_weights import read_weights_file

TINY = dict(embed_dim=64, depth=2, num_heads=2, num_classes=16)  # ViT-B/32 layout, fewer/narrower blocks


def openai_visual_state(seed=0, width=64, layers=2, output_dim=16, grid=7):
    """A random state dict in OpenAI's CLIP layout (`visual.*`, plus a text-side key to be ignored)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale
    state = {'visual.conv1.weight': rnd(width, 3, 32, 32, scale=0.02), 'visual.class_embedding': rnd(width),
             'visual.positional_embedding': rnd(grid * grid + 1, width), 'visual.proj': rnd(width, output_dim),
             'token_embedding.weight': rnd(10, width)}
    for ln in ('ln_pre', 'ln_post'):
        state[f'visual.{ln}.weight'], state[f'visual.{ln}.bias'] = 1 + rnd(width), rnd(width)
    for i in range(layers):
        p = f'visual.transformer.resblocks.{i}.'
        state.update({p + 'attn.in_proj_weight': rnd(3 * width, width), p + 'attn.in_proj_bias': rnd(3 * width),
                      p + 'attn.out_proj.weight': rnd(width, width), p + 'attn.out_proj.bias': rnd(width),
                      p + 'mlp.c_fc.weight': rnd(4 * width, width), p + 'mlp.c_fc.bias': rnd(4 * width),
                      p + 'mlp.c_proj.weight': rnd(width, 4 * width), p + 'mlp.c_proj.bias': rnd(width)})
        for ln in ('ln_1', 'ln_2'):
            state[p + f'{ln}.weight'], state[p + f'{ln}.bias'] = 1 + rnd(width), rnd(width)
    return state


def openai_encode_image(state, x, heads=2):
    """OpenAI's `VisionTransformer.forward` written out from the state dict (QuickGELU, torch's
    MultiheadAttention for `attn`): ln_post(CLS) @ proj."""
    s = {k[len('visual.'):]: v for k, v in state.items() if k.startswith('visual.')}
    width = s['class_embedding'].shape[0]
    x = F.conv2d(x, s['conv1.weight'], stride=32).flatten(2).transpose(1, 2)
    x = torch.cat([s['class_embedding'].expand(len(x), 1, -1), x], dim=1) + s['positional_embedding']
    x = F.layer_norm(x, [width], s['ln_pre.weight'], s['ln_pre.bias'])
    i = 0
    while f'transformer.resblocks.{i}.ln_1.weight' in s:
        p = f'transformer.resblocks.{i}.'
        attn = torch.nn.MultiheadAttention(width, heads, batch_first=True)
        attn.load_state_dict({k[len(p + 'attn.'):]: v for k, v in s.items() if k.startswith(p + 'attn.')})
        h = F.layer_norm(x, [width], s[p + 'ln_1.weight'], s[p + 'ln_1.bias'])
        x = x + attn(h, h, h, need_weights=False)[0]
        h = F.layer_norm(x, [width], s[p + 'ln_2.weight'], s[p + 'ln_2.bias'])
        h = F.linear(h, s[p + 'mlp.c_fc.weight'], s[p + 'mlp.c_fc.bias'])
        x = x + F.linear(h * torch.sigmoid(1.702 * h), s[p + 'mlp.c_proj.weight'], s[p + 'mlp.c_proj.bias'])
        i += 1
    return F.layer_norm(x[:, 0], [width], s['ln_post.weight'], s['ln_post.bias']) @ s['proj']


def cleanfid_preprocess(images):
    """clean-fid's `img_preprocess_clip` + `CLIP_fx` normalisation, with torchvision on PIL images."""
    resize = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224)])
    norm = T.Normalize(clip.MEAN, clip.STD)
    out = [norm(torch.from_numpy(np.asarray(resize(PIL.Image.fromarray(im.permute(1, 2, 0).numpy()).convert('RGB')))
                                 .astype(np.float32)).permute(2, 0, 1) / 255) for im in images]
    return torch.stack(out)


def random_images(n, h, w, seed=0):
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('shape', [(32, 32), (24, 40), (300, 260)])
def test_resize_matches_torchvision_resize_and_centre_crop_on_pil(shape):
    images = random_images(2, *shape)
    resize = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224)])
    expected = torch.stack([torch.from_numpy(np.array(resize(PIL.Image.fromarray(im.permute(1, 2, 0).numpy()))))
                            .permute(2, 0, 1) for im in images])
    assert torch.equal(clip.resize_like_cleanfid(images), expected)


def test_openai_layout_weights_give_openais_embedding(tmp_path):
    state = openai_visual_state()
    path = tmp_path / 'openai-layout.pt'
    torch.save(state, path)
    encoder = clip.load_clip(str(path), **TINY)
    images = random_images(3, 24, 40, seed=1)
    with torch.no_grad():
        ours = encoder(images)
        theirs = openai_encode_image(state, cleanfid_preprocess(images))
    assert ours.shape == (3, 16) and theirs.abs().max() > 0.1
    assert (ours - theirs).abs().max() < 1e-5


def test_timm_layout_weights_give_the_library_models_output(tmp_path):
    import safetensors.torch
    reference = timm.create_model('vit_base_patch32_clip_224', pretrained=False, act_layer='quick_gelu', **TINY).eval()
    path = tmp_path / 'clip.safetensors'
    safetensors.torch.save_file(reference.state_dict(), str(path))
    encoder = clip.load_clip(str(path), **TINY)
    images = random_images(2, 32, 32, seed=2)
    with torch.no_grad():
        assert torch.equal(encoder(images), reference(cleanfid_preprocess(images)))
    assert encoder.weights_id == clip.load_clip(state=read_weights_file(str(path), 'CLIP'), **TINY).weights_id


def test_wrong_layout_and_missing_weights_are_clear_errors(tmp_path, monkeypatch):
    path = tmp_path / 'other.pt'
    torch.save({'conv.weight': torch.zeros(3)}, path)
    with pytest.raises(ValueError, match=r'other\.pt: not CLIP ViT-B/32 weights of the expected architecture'):
        clip.load_clip(str(path), **TINY)
    monkeypatch.setattr(timm, 'create_model', lambda *a, **k: (_ for _ in ()).throw(OSError('offline')))
    with pytest.raises(RuntimeError, match=r'No CLIP ViT-B/32 weights available .*offline.*--clip-weights=PATH\|URL'):
        clip.load_clip()


def module_tree(state):
    """nn.Modules nested by the dotted names of `state` (the shape of OpenAI's scripted CLIP model)."""
    root = torch.nn.Module()
    for name, value in state.items():
        *path, leaf = name.split('.')
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, torch.nn.Parameter(value))
    return root


def test_torchscript_archive_like_openais_vit_b_32_pt_is_read_without_loading_its_code(tmp_path):
    """OpenAI ships ViT-B-32.pt as a TorchScript archive in float16: its data.pkl is read by the restricted
    unpickler (torch.jit.load is never called) and gives the same embedding as the state dict."""
    import warnings
    state = {k: v.half() for k, v in openai_visual_state(seed=3).items()}
    path = tmp_path / 'ViT-B-32.pt'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # torch.jit.script is deprecated
        torch.jit.script(module_tree(state)).save(str(path))
    read = read_weights_file(str(path), 'CLIP')
    assert sorted(read) == sorted(state) and all(torch.equal(read[k], state[k]) for k in state)
    encoder = clip.load_clip(str(path), **TINY)
    images = random_images(2, 32, 32, seed=4)
    with torch.no_grad():
        expected = openai_encode_image({k: v.float() for k, v in state.items()}, cleanfid_preprocess(images))
        assert (encoder(images) - expected).abs().max() < 1e-5
