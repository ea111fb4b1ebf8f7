"""Pickle-free network snapshots: the weights in a plain safetensors file, the constructor records and the
snapshot's metadata as JSON in its header (docs/checkpoint-format.md §9).

A safetensors file is an 8-byte little-endian header length, a JSON header giving every tensor's dtype,
shape and byte range, then the raw bytes; nothing in it can run. Our header adds one `__metadata__`
string, `d2o_snapshot`: JSON with the format version, per snapshot key (`ema`, `net`) the network's
class name, constructor arguments and plain root attributes (sigma_min, sigma_data, D2O's eps, ...), and
the snapshot's `dataset_kwargs`, `kimg` and source. Tensor `KEY.NAME` is entry NAME of that network's
state_dict, so `safetensors.torch.load_file` alone gives every weight.

Loading checks the header before anything is built (JSON types, a known class, constructor
arguments within training.checkpoint's bounds), builds each network on the meta device (no allocation, no random init), requires the file
to hold exactly the tensors that architecture has (names, shapes, dtypes) and assigns them.

  save(path, snapshot, info)     the networks of a snapshot dict + plain metadata, written atomically
  network_records(networks)      what the header records of each network
  load_snapshot(source) -> dict  {key: network (eval, frozen, float32), 'dataset_kwargs': ... if stored}
  read_metadata(source) -> (metadata, {tensor name: header entry}, local path)   checked, nothing built
  is_safetensors(source)         by extension, or for a local file by its first bytes
"""
import json
import os
import re

import numpy as np
import safetensors.torch
import torch

import dnnlib
from training import checkpoint

METADATA_KEY = 'd2o_snapshot'
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 8 << 20  # ~60,000 tensor entries; safetensors allows 100 MB, whose JSON could take GBs to parse
KEY_PATTERN = re.compile(r'[A-Za-z_][A-Za-z0-9_]{0,31}')
MAX_NETWORKS = 8
DTYPE_NAMES = {torch.float32: 'F32', torch.float16: 'F16', torch.bfloat16: 'BF16', torch.float64: 'F64',
               torch.int64: 'I64', torch.int32: 'I32', torch.uint8: 'U8', torch.bool: 'BOOL'}


#----------------------------------------------------------------------------
# Validation of untrusted header data.

def _is_plain(value):
    return value is None or isinstance(value, (bool, int, float, str))


def _check_metadata(meta, where):
    if not isinstance(meta, dict) or meta.get('format_version') != FORMAT_VERSION:
        version = meta.get('format_version') if isinstance(meta, dict) else None
        raise ValueError(f'{where}: {METADATA_KEY} format version {version!r}; this code reads {FORMAT_VERSION}')
    networks = meta.get('networks')
    if not isinstance(networks, dict) or not 0 < len(networks) <= MAX_NETWORKS:
        raise ValueError(f'{where}: {METADATA_KEY} must list 1 to {MAX_NETWORKS} networks')
    for key, record in networks.items():
        if not KEY_PATTERN.fullmatch(key):
            raise ValueError(f'{where}: network key {key[:40]!r} is not a plain name')
        checkpoint.check_constructor_record(record, f'{where}: network {key!r}')
        attributes = record.get('attributes', {})
        if not isinstance(attributes, dict) or not all(_is_plain(v) for v in attributes.values()):
            raise ValueError(f'{where}: network {key!r}: attributes must be an object of plain values')
    if not isinstance(meta.get('dataset_kwargs'), (dict, type(None))):
        raise ValueError(f'{where}: dataset_kwargs must be an object or null')


def _read_header(path, where):
    """(header length, parsed header) of a safetensors file, with its size checked before reading."""
    size = os.path.getsize(path)
    with open(path, 'rb') as f:
        head = f.read(8)
        length = int.from_bytes(head, 'little') if len(head) == 8 else 0
        if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f'{where}: truncated or not a safetensors file (header of {length} bytes in a file of '
                             f'{size} bytes)')
        text = f.read(length)
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise ValueError(f'{where}: the safetensors header is not valid JSON ({type(err).__name__})') from None
    if not isinstance(header, dict):
        raise ValueError(f'{where}: the safetensors header is not a JSON object')
    return length, header


def read_metadata(source):
    """(our metadata, {tensor name: {'dtype', 'shape', 'data_offsets'}}, local path: the cached download for a
    URL) of a safetensors snapshot, checked; nothing is built or read beyond the header."""
    where = str(source)
    path = dnnlib.util.open_url(source, return_filename=True)
    length, header = _read_header(path, where)
    strings = header.pop('__metadata__', None)
    if not isinstance(strings, dict) or not isinstance(strings.get(METADATA_KEY), str):
        raise ValueError(f'{where}: a safetensors file without the {METADATA_KEY!r} metadata string (network class '
                         f'and constructor arguments); write snapshots with checkpoint_tool.py convert')
    try:
        meta = json.loads(strings[METADATA_KEY])
    except (ValueError, RecursionError) as err:
        raise ValueError(f'{where}: the {METADATA_KEY!r} metadata is not valid JSON ({type(err).__name__})') from None
    _check_metadata(meta, where)
    _check_entries(header, length, os.path.getsize(path), where)
    return meta, header, path


def _check_entries(entries, length, size, where):
    for name, entry in entries.items():
        if not (isinstance(entry, dict) and isinstance(entry.get('dtype'), str) and isinstance(entry.get('shape'), list)
                and all(type(n) is int for n in entry['shape'])
                and isinstance(entry.get('data_offsets'), list) and len(entry['data_offsets']) == 2
                and all(type(n) is int for n in entry['data_offsets'])):
            raise ValueError(f'{where}: tensor {name[:80]!r} has a malformed header entry')
    end = max((entry['data_offsets'][1] for entry in entries.values()), default=0)
    if 8 + length + end != size:
        raise ValueError(f'{where}: truncated or padded safetensors file: the header describes {8 + length + end} '
                         f'bytes, the file has {size}')


def _listing(names, limit=5):
    return ', '.join(names[:limit]) + (f' and {len(names) - limit} more' if len(names) > limit else '')


def _check_tensors(entries, expected, where):
    """The file must hold exactly the tensors the rebuilt architectures have, with the same shapes and dtypes."""
    missing = sorted(set(expected) - set(entries))
    unexpected = sorted(set(entries) - set(expected))
    wrong = [f'{name} {entries[name]["dtype"]}{entries[name]["shape"]} (expected {DTYPE_NAMES.get(t.dtype, t.dtype)}'
             f'{list(t.shape)})' for name, t in expected.items() if name in entries
             and (entries[name]['shape'] != list(t.shape) or entries[name]['dtype'] != DTYPE_NAMES.get(t.dtype))]
    problems = [f'{what}: {_listing(names)}' for what, names in
                (('missing', missing), ('unexpected', unexpected), ('wrong dtype or shape', wrong)) if names]
    if problems:
        raise ValueError(f'{where}: tensors do not match the architecture in the header; {"; ".join(problems)}')

#----------------------------------------------------------------------------
# Building and loading.

def build_on_meta(record, where):
    """The network of a constructor record (bounds checked first), on the meta device (its tensors are assigned
    afterwards)."""
    checkpoint.check_constructor_record(record, where)
    with torch.device('meta'):
        try:
            return checkpoint.build_network(record, where)
        except Exception as err:  # any failure of our constructors on a bad record is a bad file
            raise ValueError(f'{where}: cannot build {record["class_name"]} from its constructor record '
                             f'({type(err).__name__}: {err})') from None


def _check_attributes(net, attributes, where):
    for name, value in attributes.items():
        ours = vars(net).get(name, value)
        ours = ours.item() if isinstance(ours, np.generic) else ours
        if _is_plain(ours) and ours != value:
            raise ValueError(f'{where}: attribute {name} is {value!r} in the file but {ours!r} when rebuilt; '
                             f'the file was written by incompatible code')


def load_snapshot(source):
    """A snapshot dict like training.checkpoint.load_snapshot's: {key: network in eval mode, requires_grad False,
    float32} plus `dataset_kwargs` when the file records one."""
    where = str(source)
    meta, entries, path = read_metadata(source)
    nets = {key: build_on_meta(record, f'{where}: network {key!r}') for key, record in meta['networks'].items()}
    expected = {f'{key}.{name}': t for key, net in nets.items() for name, t in net.state_dict().items()}
    _check_tensors(entries, expected, where)
    try:
        tensors = safetensors.torch.load_file(path)
    except Exception as err:  # SafetensorError: offsets or sizes that do not fit
        raise ValueError(f'{where}: corrupt safetensors file ({err})') from None
    snapshot = {}
    for key, net in nets.items():
        net.load_state_dict({name: tensors[f'{key}.{name}'] for name in net.state_dict()}, strict=True, assign=True)
        _check_attributes(net, meta['networks'][key].get('attributes', {}), f'{where}: network {key!r}')
        snapshot[key] = net.eval().requires_grad_(False)
    if meta.get('dataset_kwargs') is not None:
        snapshot['dataset_kwargs'] = meta['dataset_kwargs']
    return snapshot


def is_safetensors(source):
    """By the `.safetensors` extension, or for a local file by its first bytes: a little-endian header
    length that fits the file, then '{' (pickles start with 0x80 or an opcode, zips with 'PK')."""
    name = os.fspath(source)
    if name.lower().endswith('.safetensors'):
        return True
    if dnnlib.util.is_url(name) or not os.path.isfile(name):
        return False
    with open(name, 'rb') as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') <= os.path.getsize(name) - 9

#----------------------------------------------------------------------------
# Saving.

def _root_attributes(net):
    """The root's plain attributes (the preconditioner's sigma_min/max, sigma_data, D2O's eps, ...)."""
    plain = {name: value.item() if isinstance(value, np.generic) else value for name, value in vars(net).items()
             if not name.startswith('_') and name != 'training'}
    return {name: value for name, value in plain.items() if _is_plain(value)}


def network_records(networks):
    """{key: constructor record + root attributes} of {key: our network}, as stored in the header."""
    return {key: dict(checkpoint.network_constructor_record(net), attributes=_root_attributes(net))
            for key, net in networks.items()}


def save(path, snapshot, info):
    """Write the networks of `snapshot` ({key: our network, ...}; other entries are left out) with `info`
    (plain data: dataset_kwargs, kimg, source) atomically as a safetensors snapshot."""
    networks = {key: net for key, net in snapshot.items() if isinstance(net, torch.nn.Module)}
    if not networks:
        raise ValueError(f'{path}: the snapshot holds no network to write')
    records, tensors, seen = network_records(networks), {}, set()
    for key, net in networks.items():
        for name, t in net.state_dict().items():
            t = t.detach().cpu().contiguous()
            tensors[f'{key}.{name}'] = t.clone() if t.untyped_storage().data_ptr() in seen else t  # no shared storage
            seen.add(t.untyped_storage().data_ptr())
    try:
        text = json.dumps(dict(format_version=FORMAT_VERSION, networks=records, **info))
    except TypeError as err:
        raise ValueError(f'{path}: the snapshot metadata is not plain JSON data ({err})') from None
    data = safetensors.torch.save(tensors, metadata={'format': 'pt', METADATA_KEY: text})
    with dnnlib.util.atomic_write(path) as f:
        f.write(data)
