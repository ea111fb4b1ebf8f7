"""torch_utils/persistence.py: our networks pickle in EDM's persistence format (docs/checkpoint-format.md §2)."""
import copy
import io
import pickle
import pickletools
from pathlib import Path

import pytest
import torch

from torch_utils import persistence
from training import networks

REPO = Path(__file__).resolve().parents[1]
TINY = dict(img_resolution=16, img_channels=3, model_type='SongUNet', model_channels=16, channel_mult=[1, 2],
            num_blocks=1, attn_resolutions=[8], dropout=0.0, embedding_type='fourier', encoder_type='residual',
            channel_mult_noise=2, resample_filter=[1, 3, 3, 1])


class MetaCapture(pickle.Unpickler):
    """Returns each persistent object's meta dict instead of rebuilding it; records the globals used."""

    def find_class(self, module, name):
        self.globals_used.add((module, name))
        if (module, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
            return lambda meta: meta
        return super().find_class(module, name)


def test_decorated_class_keeps_identity_and_records_constructor():
    channel_mult = [1, 2]
    net = networks.D2OPrecond(**dict(TINY, channel_mult=channel_mult))
    channel_mult.append(4)  # the record is a deep copy
    assert type(net).__name__ == 'D2OPrecond' and type(net).__module__ == 'training.networks'
    assert persistence.is_persistent(net) and persistence.is_persistent(networks.UNetBlock)
    assert not persistence.is_persistent(torch.nn.Linear(1, 1)) and not persistence.is_persistent({})
    assert net._init_args == () and net._init_kwargs['channel_mult'] == [1, 2]
    assert net.model._init_kwargs['label_dim'] == 0
    assert persistence.persistent_class(networks.Linear) is networks.Linear


def test_pickle_stream_is_edm_format():
    net = networks.D2OPrecond(**TINY)
    data = pickle.dumps(net, protocol=4)
    source = (REPO / 'training' / 'networks.py').read_text()
    strings = [arg for op, arg, _ in pickletools.genops(data) if op.name in ('SHORT_BINUNICODE', 'BINUNICODE')]
    assert strings.count(source) == 1  # one shared, memoised copy of the module source

    unpickler = MetaCapture(io.BytesIO(data))
    unpickler.globals_used = set()
    meta = unpickler.load()
    assert unpickler.globals_used == {
        ('torch_utils.persistence', '_reconstruct_persistent_obj'), ('torch._utils', '_rebuild_tensor_v2'),
        ('torch._utils', '_rebuild_parameter'), ('torch.storage', '_load_from_bytes'), ('collections', 'OrderedDict'),
        ('torch.nn.modules.container', 'ModuleDict'), ('numpy._core.multiarray', 'scalar'), ('numpy', 'dtype')}
    assert (meta['type'], meta['version'], meta['class_name']) == ('class', 6, 'D2OPrecond')
    assert meta['module_src'] == source
    state = meta['state']
    assert state['_init_args'] == () and state['_init_kwargs'] == TINY
    assert (state['eps'], state['counter'], state['sigma_data']) == (2e-3, 0, 0.5)
    block = state['_modules']['model']['state']['_modules']['enc'].__dict__['_modules']['8x8_block0']
    assert block['class_name'] == 'UNetBlock' and block['state']['skip_scale'] == pytest.approx(0.5 ** 0.5)
    assert block['state']['_modules']['norm0']['state']['_parameters']['weight'].shape == (16,)


def test_plain_pickle_roundtrip_and_deepcopy_rebuild_our_class():
    torch.manual_seed(0)
    net = networks.EDMPrecond(**TINY).eval()
    x = torch.randn(2, 3, 16, 16)
    for clone in (pickle.loads(pickle.dumps(net)), copy.deepcopy(net)):
        assert type(clone) is type(net) and clone._init_kwargs == net._init_kwargs
        assert torch.equal(clone(x, 1.5), net(x, 1.5))


def test_reconstruct_rejects_other_versions():
    with pytest.raises(ValueError, match='version 6'):
        persistence._reconstruct_persistent_obj(dict(type='class', version=5, module_src='', class_name='X', state={}))
