"""Zip members whose headers are not trusted (datasets, torch files, npz references; docs/threat-model.md):
zipfile reads a stored member's compressed size in one read() call, which reserves that many bytes before
reading (a 1 KB archive can declare 4 GiB), and inflates a member up to its declared size. `check_member`
compares both with the archive and a cap before a byte is read."""
import io


def archive_bytes(archive):
    """Size of the file behind an open zipfile.ZipFile (no member may be open while this runs)."""
    position = archive.fp.tell()
    end = archive.fp.seek(0, io.SEEK_END)
    archive.fp.seek(position)
    return end


def compressed_overrun(info, size):
    """What is wrong when member `info` declares more compressed bytes than its archive of `size` bytes holds
    (zipfile would reserve them all in one read), else None."""
    if info.compress_size > size:
        return f'declares {info.compress_size:,} compressed bytes in an archive of {size:,} bytes'
    return None


def check_member(archive, info, limit, label, size=None):
    """ValueError naming `label` unless member `info` fits in the archive (its compressed bytes) and inflates to
    at most `limit` bytes. `size`: archive_bytes(archive), when the caller has it."""
    overrun = compressed_overrun(info, archive_bytes(archive) if size is None else size)
    if overrun:
        raise ValueError(f'{label}: {overrun}')
    if info.file_size > limit:
        raise ValueError(f'{label}: inflates to {info.file_size:,} bytes; at most {limit:,} are read per member')
