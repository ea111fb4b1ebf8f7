"""Network checkpoints as pickle-free safetensors files (docs/checkpoint-format.md §9), for sharing.

  python checkpoint_tool.py convert --source=network-snapshot-005000.pkl --dest=d2o-cifar10.safetensors
  python checkpoint_tool.py convert --source=training-state-005000.pt --dest=run-005000.safetensors
  python checkpoint_tool.py info --source=d2o-cifar10.safetensors

`convert` reads an EDM, D2O or our snapshot pickle (safely, as generate.py does) or a train.py training state
(its G_ema becomes `ema`, its G `net`, like the run's own snapshots) and writes the networks' weights, their
constructor records and the snapshot's metadata. Every tool that takes a network (generate.py --network,
train.py --transfer, python -m training.analysis, validation_fid.sh) reads the result. Expected failures end
with one line `Error: ...` and exit status 1; `--debug` (or D2O_DEBUG=1) shows the traceback.
"""
import json
import os
import re

import click
import torch

from dnnlib import cli
from training import checkpoint, safetensors_snapshot, state as training_state


def _left_out(value):
    if value is None:
        return None
    return value.class_name if isinstance(value, checkpoint.PersistentRecord) else type(value).__name__


def _kimg_from_name(source):
    """EDM's `network-snapshot-{kimg:06d}.pkl` (ours: three decimals under 1 kimg); None for other names."""
    match = re.fullmatch(r'network-snapshot-(\d+(?:\.\d+)?)\.\w+', os.path.basename(str(source)))
    return float(match.group(1)) if match else None


def _training_state_networks(data, where):
    """{'ema': G_ema, 'net': G} of a train.py training state, built from its checked G_record."""
    if data.get('version') != training_state.STATE_VERSION:
        raise ValueError(f'{where}: training-state version {data.get("version")!r}; this code reads '
                         f'{training_state.STATE_VERSION}')
    networks = {}
    for key, entry in (('ema', 'G_ema'), ('net', 'G')):
        net = safetensors_snapshot.build_on_meta(data['G_record'], f'{where}: G_record')
        if not isinstance(data.get(entry), dict):
            raise ValueError(f'{where}: {entry} is not a state dict')
        try:
            net.load_state_dict(data[entry], strict=True, assign=True)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f'{where}: {entry} does not match G_record: {" ".join(str(err).split())}') from None
        networks[key] = net.to(torch.float32).eval().requires_grad_(False)
    return networks


def read_source(source, allow_unsafe_pickle):
    """(networks {key: module}, info for the header) of a snapshot pickle, a training state or a safetensors file."""
    where = str(source)
    data = checkpoint.load_snapshot(source, allow_unsafe_pickle=allow_unsafe_pickle)
    origin = dict(file=os.path.basename(where))
    if 'G_record' in data:
        networks = _training_state_networks(data, where)
        nimg = data.get('cur_nimg')
        kimg = nimg / 1000 if type(nimg) is int and nimg >= 0 else None
        return networks, dict(dataset_kwargs=None, training_config=data.get('config'), kimg=kimg,
                              source=dict(origin, kind='training state'))
    networks = {key: value for key, value in data.items() if isinstance(value, torch.nn.Module)}
    if not networks:
        raise ValueError(f'{where}: the snapshot holds none of the networks {sorted(checkpoint.NETWORK_CLASSES)}; '
                         f'it holds {sorted(data)}')
    left_out = {key: _left_out(value) for key, value in data.items() if key not in networks and key != 'dataset_kwargs'}
    return networks, dict(dataset_kwargs=data.get('dataset_kwargs'), kimg=_kimg_from_name(source),
                          source=dict(origin, kind='snapshot', left_out=left_out))


def _check_dest(source, dest, force):
    if not dest.lower().endswith('.safetensors'):
        raise click.BadParameter(f'{dest}: expected a file name ending in .safetensors', param_hint='--dest')
    if os.path.isdir(dest):
        raise click.BadParameter(f'{dest} is a folder; expected a .safetensors file path', param_hint='--dest')
    if os.path.exists(dest) and os.path.exists(source) and os.path.samefile(source, dest):
        raise click.BadParameter(f'{dest} is the source file itself', param_hint='--dest')
    if os.path.exists(dest) and not force:
        raise click.BadParameter(f'{dest} exists; pass --force to replace it', param_hint='--dest')


@click.group(cls=cli.Group, no_args_is_help=False)
def main():
    """Convert network snapshots to safetensors and show what a checkpoint holds."""


@main.command('convert')
@click.option('--source', required=True, metavar='PKL|PT|URL', help='EDM/D2O/our snapshot pickle or a training state')
@click.option('--dest', required=True, metavar='FILE', help='Output .safetensors file (written atomically)')
@click.option('--force', is_flag=True, help='Replace an existing --dest')
@click.option('--allow-unsafe-pickle', is_flag=True, help='Let the pickle run its own code (only for trusted files)')
@cli.debug_option
def convert(source, dest, force, allow_unsafe_pickle):
    """Write the networks of a snapshot or training state as a safetensors file."""
    _check_dest(source, dest, force)
    networks, info = read_source(source, allow_unsafe_pickle)
    safetensors_snapshot.save(dest, networks, info)
    click.echo(f'Wrote {", ".join(f"{key} ({type(net).__name__})" for key, net in networks.items())} to {dest} '
               f'({os.path.getsize(dest):,} bytes)')


def _tensor_counts(shapes):
    """{network key: (tensors, numbers)} from {'KEY.NAME': shape}."""
    counts = {}
    for name, shape in shapes.items():
        tensors, numbers = counts.get(name.split('.', 1)[0], (0, 0))
        counts[name.split('.', 1)[0]] = (tensors + 1, numbers + int(torch.Size(shape).numel()))
    return counts


@main.command('info')
@click.option('--source', required=True, metavar='FILE|URL', help='A .safetensors snapshot, snapshot pickle or state')
@click.option('--allow-unsafe-pickle', is_flag=True, help='Let the pickle run its own code (only for trusted files)')
@cli.debug_option
def info(source, allow_unsafe_pickle):
    """Print the networks (class, tensor and number counts, constructor arguments) and the metadata of a file;
    a .safetensors file is described from its checked header alone (nothing is built)."""
    if safetensors_snapshot.is_safetensors(source):
        meta, entries, _path = safetensors_snapshot.read_metadata(source)
        shapes = {name: entry['shape'] for name, entry in entries.items()}
    else:
        networks, extra = read_source(source, allow_unsafe_pickle)
        meta = dict(networks=safetensors_snapshot.network_records(networks), **extra)
        shapes = {f'{key}.{name}': t.shape for key, net in networks.items() for name, t in net.state_dict().items()}
    counts = _tensor_counts(shapes)
    for key, record in meta['networks'].items():
        tensors, numbers = counts.get(key, (0, 0))
        click.echo(f'{key}: {record["class_name"]}, {numbers:,} parameters and buffers in {tensors} tensors')
        click.echo(f'  init_kwargs: {json.dumps(record.get("init_kwargs"))}')
        if record.get('attributes'):
            click.echo(f'  attributes: {json.dumps(record["attributes"])}')
    for key, value in meta.items():
        if key != 'networks':
            click.echo(f'{key}: {json.dumps(value)}')


if __name__ == '__main__':
    main()
