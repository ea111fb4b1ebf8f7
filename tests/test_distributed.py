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


def test_rank_batches_is_edms_split():
    import numpy as np
    for n, batch, world in [(10, 3, 2), (7, 2, 3), (1, 64, 2), (0, 4, 1), (100, 8, 4)]:
        shares = [distributed.rank_batches(range(n), batch, rank, world) for rank in range(world)]
        chunks = np.array_split(np.arange(n), max(-(-n // (batch * world)), 1) * world)  # EDM's generate.py split
        for rank in range(world):
            assert shares[rank] == [c.tolist() for c in chunks[rank::world] if len(c)]
        flat = sorted(i for share in shares for chunk in share for i in chunk)
        assert flat == list(range(n)) and all(len(c) <= batch for s in shares for c in s)
    assert distributed.rank_batches([5, 9, 11], 2) == [[5, 9], [11]]  # this process: everything
    assert distributed.broadcast_object({'a': 1}) == {'a': 1}
