"""The offset index of one tar shard: where each sample's image and sidecars start, built once, cached.

A shard in the webdataset layout is an uncompressed tar whose members are named ``{key}.{ext}``:
the key is the member path up to the first dot of its file name, the extension the rest
(``a/b.c.jpg`` → key ``a/b``, extension ``c.jpg``). The members sharing a key form one sample. A
sample is indexed when it has an image member (``jpg``, ``jpeg``, ``png`` or ``webp``; the first one
in the tar wins); its ``cls`` member (an integer as text) is read into the index as the label (-1
without one) and the position of its ``json`` member is recorded, so reading a sample later is one
``pread`` of known bytes, never a scan.

The index is an ``.npz`` of plain arrays (read with ``allow_pickle=False``) stored next to the shard
as ``{shard}.idx.npz``, or, when that folder is not writable or a cache folder is given, in the
cache folder as ``{hash of the shard's absolute path}-{shard name}.idx.npz``. It records the tar's
size and modification time; an index whose shard changed is rebuilt. Building reads only the tar
headers (and the small ``cls`` members): ``tarfile`` seeks over the image bytes.

A shard cut short (an interrupted copy) keeps the samples whose headers were read; their images
that run past the end of the file fail when read, and the dataset skips them like any corrupt
image. A damaged header ends the index of that shard with one warning naming the byte offset.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dinov2.data.string_array import StringArray

logger = logging.getLogger(__name__)

INDEX_SUFFIX = ".idx.npz"
INDEX_VERSION = 1
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the code stored per sample is the position in this tuple
LABEL_EXT = "cls"
METADATA_EXT = "json"
_COMPRESSED_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/dinov2/shard-index`` (``~/.cache/dinov2/shard-index`` without the variable)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dinov2" / "shard-index"


def split_member_name(name: str) -> tuple[str, str]:
    """``(key, extension)`` of a member: the split is at the first dot of the file name."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :].lower()


@dataclass
class ShardIndex:
    """Per-sample arrays of one shard (``n`` samples, in the order of their first member in the tar)."""

    keys: StringArray
    image_offset: np.ndarray  # int64, byte offset of the image member's data
    image_size: np.ndarray  # int64, its length
    image_ext: np.ndarray  # uint8, index into IMAGE_EXTS
    label: np.ndarray  # int64, the cls member's integer, -1 without one
    json_offset: np.ndarray  # int64, -1 without a json member
    json_size: np.ndarray  # int64
    tar_size: int
    tar_mtime_ns: int

    def __len__(self) -> int:
        return len(self.image_offset)

    def member_name(self, i: int) -> str:
        """The image member's name, its extension in lower case."""
        return f"{self.keys[i]}.{IMAGE_EXTS[int(self.image_ext[i])]}"

    def key_positions(self) -> dict[str, int]:
        """Key → sample number (for look-ups by name, e.g. of manifest rows)."""
        return {k: i for i, k in enumerate(self.keys)}

    # ------------------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temporary file in the same folder, then rename)."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(
                    f,
                    version=np.int64(INDEX_VERSION),
                    keys_buffer=self.keys.buffer,
                    keys_offsets=self.keys.offsets,
                    image_offset=self.image_offset,
                    image_size=self.image_size,
                    image_ext=self.image_ext,
                    label=self.label,
                    json_offset=self.json_offset,
                    json_size=self.json_size,
                    tar_stat=np.array([self.tar_size, self.tar_mtime_ns], dtype=np.int64),
                )
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> ShardIndex:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != INDEX_VERSION:
                raise ValueError(f"{path}: index version {int(z['version'])}, expected {INDEX_VERSION}")
            keys = StringArray.from_buffers(z["keys_buffer"], z["keys_offsets"])
            size, mtime = (int(v) for v in z["tar_stat"])
            return cls(
                keys,
                z["image_offset"],
                z["image_size"],
                z["image_ext"],
                z["label"],
                z["json_offset"],
                z["json_size"],
                size,
                mtime,
            )

    def matches(self, shard: str | os.PathLike) -> bool:
        """Whether this index describes ``shard`` as it is now (same size and modification time)."""
        st = os.stat(shard)
        return st.st_size == self.tar_size and st.st_mtime_ns == self.tar_mtime_ns


# ---------------------------------------------------------------------------------------- building
def _check_uncompressed(path: str) -> None:
    with open(path, "rb") as f:
        head = f.read(6)
    for magic, name in _COMPRESSED_MAGIC.items():
        if head.startswith(magic):
            raise ValueError(
                f"{path} is {name}-compressed: samples of a compressed tar cannot be read at random; "
                "decompress the shards (e.g. gunzip) or repack them"
            )


def build_index(shard: str | os.PathLike) -> ShardIndex:
    """Scan the headers of ``shard`` (see the module docstring)."""
    shard = os.fspath(shard)
    _check_uncompressed(shard)
    st = os.stat(shard)
    order: dict[str, int] = {}  # key -> sample number
    image: dict[int, tuple[int, int, int]] = {}
    labels: dict[int, int] = {}
    jsons: dict[int, tuple[int, int]] = {}
    bad_labels = 0
    end_of_members = 0
    with tarfile.open(shard, mode="r:") as tar:
        try:
            for member in tar:
                end_of_members = member.offset_data + -(-member.size // 512) * 512
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if key.rsplit("/", 1)[-1].startswith(("__", ".")):
                    continue  # webdataset's reserved names and hidden files
                sample = order.setdefault(key, len(order))
                if ext in IMAGE_EXTS and sample not in image:
                    image[sample] = (member.offset_data, member.size, IMAGE_EXTS.index(ext))
                elif ext == LABEL_EXT and member.offset_data + member.size <= st.st_size:
                    try:
                        labels[sample] = int(tar.extractfile(member).read().decode("utf-8").strip())
                    except (UnicodeDecodeError, ValueError):
                        bad_labels += 1
                elif ext == METADATA_EXT and sample not in jsons:
                    jsons[sample] = (member.offset_data, member.size)
        except tarfile.ReadError as error:  # cut short: keep what was read (see the module docstring)
            logger.warning("shard %s ends early (%s) after %d samples", shard, error, len(order))
        if end_of_members and end_of_members + 512 <= st.st_size:
            tar.fileobj.seek(end_of_members)
            block = tar.fileobj.read(512)
            if block.strip(b"\0"):
                logger.warning(
                    "shard %s: unreadable tar header at byte %d; the members after it are not indexed",
                    shard,
                    end_of_members,
                )
    if bad_labels:
        logger.warning("shard %s: %d .cls members are not integers (label -1)", shard, bad_labels)
    with_image = [(key, s) for key, s in order.items() if s in image]
    n = len(with_image)
    index = ShardIndex(
        keys=StringArray(key for key, _ in with_image),
        image_offset=np.array([image[s][0] for _, s in with_image], dtype=np.int64).reshape(n),
        image_size=np.array([image[s][1] for _, s in with_image], dtype=np.int64).reshape(n),
        image_ext=np.array([image[s][2] for _, s in with_image], dtype=np.uint8).reshape(n),
        label=np.array([labels.get(s, -1) for _, s in with_image], dtype=np.int64).reshape(n),
        json_offset=np.array([jsons.get(s, (-1, 0))[0] for _, s in with_image], dtype=np.int64).reshape(n),
        json_size=np.array([jsons.get(s, (-1, 0))[1] for _, s in with_image], dtype=np.int64).reshape(n),
        tar_size=st.st_size,
        tar_mtime_ns=st.st_mtime_ns,
    )
    if len(order) > n:
        logger.info("shard %s: %d of %d keys have no image member (%s)", shard, len(order) - n, len(order), IMAGE_EXTS)
    return index


# ------------------------------------------------------------------------------------------ caching
def index_paths(shard: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Where the index of ``shard`` may be, in the order looked at: beside it, then in the cache."""
    shard = Path(os.path.abspath(shard))
    digest = hashlib.sha1(str(shard).encode()).hexdigest()[:16]
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    return [shard.with_name(shard.name + INDEX_SUFFIX), cache / f"{digest}-{shard.name}{INDEX_SUFFIX}"]


def load_or_build_index(shard: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> ShardIndex:
    """The index of ``shard``: a stored one that still matches it, else built and stored.

    A new index goes beside the shard when no ``cache_dir`` is given and that folder is writable,
    else into ``cache_dir`` (default :func:`default_cache_dir`).
    """
    beside, cached = index_paths(shard, cache_dir)
    for path in (beside, cached):
        if path.is_file():
            try:
                index = ShardIndex.load(path)
            except Exception as error:  # a damaged or foreign file: rebuild rather than fail
                logger.warning("ignoring unreadable shard index %s (%s)", path, error)
                continue
            if index.matches(shard):
                return index
    index = build_index(shard)
    targets = [cached] if cache_dir else [beside, cached]
    for path in targets:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            index.save(path)
            return index
        except OSError:
            continue
    logger.warning("could not store the index of %s (tried %s); it is rebuilt on every start", shard, targets)
    return index
