import torch

from torch_utils import distributed


def test_single_process_mode(monkeypatch, capsys):
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        monkeypatch.delenv(key, raising=False)
    distributed.shutdown()
    device = distributed.init()
    assert device.type == ('cuda' if torch.cuda.is_available() else 'cpu')
    assert (distributed.rank(), distributed.world_size(), distributed.is_distributed()) == (0, 1, False)
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    distributed.barrier()
    distributed.print0('hello from rank 0')
    assert capsys.readouterr().out == 'hello from rank 0\n'


def test_world_size_without_torchrun_variables_is_an_error(monkeypatch):
    distributed.shutdown()
    monkeypatch.setenv('WORLD_SIZE', '2')
    monkeypatch.delenv('MASTER_ADDR', raising=False)
    try:
        distributed.init()
    except RuntimeError as err:
        assert 'torchrun' in str(err)
    else:
        raise AssertionError('expected an error')
    finally:
        distributed.shutdown()
