"""Async wrapper around ``qemu-img``: info, create, resize, measure, check, convert, commit.

Each call runs one ``qemu-img`` process with ``asyncio.create_subprocess_exec`` and an argv
list (no shell), in a session and process group of its own, with ``LC_ALL=C`` so that its
messages can be recognised. Paths are made absolute before they are passed, so a name that
starts with ``-`` is never read as an option and one with a ``:`` never as a protocol
(``nbd:``, ``json:``). stderr is kept in a bounded buffer for error messages; stdout is
either the ``--output=json`` document or, for ``convert`` and ``commit``, the ``-p``
progress stream.

Images are named by a path and a format, or by a :class:`Chain`: every image of a chain
with its format, top first, given to qemu-img as a ``json:`` filename that spells out each
image's backing (the next one, none for the last). A chain is opened as stated whatever
the images' headers name as their backing files; a bare path lets the header decide,
so code that opens volumes passes chains.

Cancelling the task that awaits a call stops the process: SIGTERM to its process group,
SIGKILL after :data:`TERM_GRACE` seconds, then the call waits for it to exit (at most
:data:`KILL_WAIT` seconds more: a process stuck in the kernel on dead storage cannot be
killed, and is then left to the child watcher). ``create`` and ``convert`` remove the target
they created when they fail or are cancelled. A cancelled or failed ``commit`` leaves the
base partially written: the caller must mark the chain illegal *before* it starts one.

No cache option is passed: qemu-img's defaults (``writeback`` for source and target, no
``-W``, 8 coroutines) are kept, so ``convert`` runs exactly as a direct ``qemu-img convert``.

Errors::

    Exception
     ├── QemuImgError        qemu-img failed: .status (None when killed), .stderr (last lines)
     │    ├── NoSpace        the target's filesystem is full (ENOSPC)
     │    ├── ImageInUse     another process holds a conflicting lock on an image
     │    └── Timeout        it did not finish within the call's timeout and was killed
     ├── ValueError
     │    └── ShrinkRefused  resize() to a size below the current one
     └── FileExistsError     create() or convert() onto a path that exists
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Collection, Coroutine, Sequence
from typing import Any

from virtnode.util.aio import to_the_end

log = logging.getLogger(__name__)

QEMU_IMG = "qemu-img"
#: qemu-img is started through util-linux's ``setpriv --pdeathsig KILL`` where it exists:
#: its own process group keeps it from the agent's signals, and without a death signal
#: a copy would go on writing after the agent was killed (into a target the restarted
#: agent removes as half-made).
_PREFIX: tuple[str, ...] = (
    (shutil.which("setpriv") or "setpriv", "--pdeathsig", "KILL", "--")
    if shutil.which("setpriv") else ())
#: Default timeout of the calls that only read metadata (info, measure).
METADATA_TIMEOUT = 60.0
#: Seconds between SIGTERM and SIGKILL when a call is cancelled or times out.
TERM_GRACE = 5.0
#: Seconds to wait for the process to exit after SIGKILL before giving up on it.
KILL_WAIT = 10.0
#: Shortest interval between two progress callbacks.
PROGRESS_INTERVAL = 0.5
#: How much of stderr is kept, and how many of its last lines go into an error.
STDERR_LIMIT = 64 * 1024
STDERR_LINES = 10
#: Largest stdout document accepted (a long --backing-chain is a few KiB per image).
STDOUT_LIMIT = 16 * 1024 * 1024

PREALLOCATION = ("off", "metadata", "falloc", "full")
#: What a vmdk made by :func:`convert` may be: ``streamOptimized`` is the OVA kind.
VMDK_SUBFORMATS = ("monolithicSparse", "streamOptimized")

_ENV = {**os.environ, "LC_ALL": "C"}
_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")

PathLike = str | os.PathLike[str]
ProgressCallback = Callable[[float], None]


class QemuImgError(Exception):
    """qemu-img failed; ``status`` is its exit status (None when it was killed)."""

    def __init__(self, message: str, *, status: int | None, stderr: str) -> None:
        super().__init__(f"{message}: {stderr}" if stderr else message)
        self.status = status
        self.stderr = stderr


class NoSpace(QemuImgError):
    """The filesystem of the image being written is full (ENOSPC)."""


class ImageInUse(QemuImgError):
    """Another process (a running VM, another qemu-img) holds a lock on an image."""


class Timeout(QemuImgError):
    """qemu-img did not finish within the call's timeout and was killed."""


class ShrinkRefused(ValueError):
    """resize() was asked for a size below the image's current virtual size."""


#: Formats a :class:`Chain` may hold; raw is a plain file and can only be last.
CHAIN_FORMATS = ("raw", "qcow2")


@dataclasses.dataclass(frozen=True)
class Chain:
    """An image and every image below it, top first, as ``(absolute path, format)``.

    qemu-img opens exactly these files: each qcow2 layer's backing is the next layer and
    the last one has none (``"backing": null``), whatever their headers say; each file is
    opened by the ``file`` driver, so its name is never read as a protocol. Raises
    ``ValueError`` for an empty chain, a relative path, an unknown format or a raw image
    above another.
    """

    layers: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("a chain holds at least one image")
        for index, (path, fmt) in enumerate(self.layers):
            if not os.path.isabs(path):
                raise ValueError(f"{path!r} is not an absolute path")
            if fmt not in CHAIN_FORMATS:
                raise ValueError(f"format {fmt!r} is not one of {CHAIN_FORMATS}")
            if fmt == "raw" and index < len(self.layers) - 1:
                raise ValueError(f"{path} is raw and cannot have a backing file")

    @classmethod
    def of(cls, *layers: tuple[PathLike, str]) -> Chain:
        return cls(tuple((os.fspath(path), fmt) for path, fmt in layers))

    def node(self) -> dict[str, Any]:
        """The options of the top node, with every node below it nested as its backing."""
        below: dict[str, Any] | None = None
        for path, fmt in reversed(self.layers):
            node: dict[str, Any] = {"driver": fmt,
                                    "file": {"driver": "file", "filename": path}}
            if fmt != "raw":
                node["backing"] = below
            below = node
        assert below is not None
        return below

    def filename(self) -> str:
        """The ``json:`` filename qemu-img is given for this chain."""
        return "json:" + json.dumps(self.node(), separators=(",", ":"))


# --- pure parts: results and output parsing -------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What ``qemu-img info --output=json`` says about one image."""

    filename: str
    format: str
    virtual_size: int
    actual_size: int | None
    cluster_size: int | None
    #: The backing file as written in the image (often relative), its format, and the
    #: path qemu-img resolved it to.
    backing_file: str | None
    backing_format: str | None
    full_backing_file: str | None
    dirty: bool
    encrypted: bool
    #: qcow2 only: the image is marked corrupt and can only be opened read-only.
    corrupt: bool
    #: qcow2 only: the external data file its header names.
    data_file: str | None = None
    #: vmdk only: the files holding its data (the image itself for a one-file vmdk).
    extents: tuple[str, ...] = ()
    #: The images below this one, nearest first (empty without ``backing_chain``).
    backing_chain: tuple[ImageInfo, ...] = ()


@dataclasses.dataclass(frozen=True)
class Measurement:
    """``qemu-img measure``: bytes the target needs now, and when fully allocated."""

    required: int
    fully_allocated: int


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """``qemu-img check``; ``supported`` is False for formats without checks (raw)."""

    supported: bool
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    image_end_offset: int | None = None

    @property
    def clean(self) -> bool:
        return self.corruptions == 0 and self.leaks == 0 and self.check_errors == 0


def _one_info(data: dict[str, Any]) -> ImageInfo:
    specific = data.get("format-specific", {}).get("data", {})
    return ImageInfo(
        filename=data["filename"],
        format=data["format"],
        virtual_size=int(data["virtual-size"]),
        actual_size=data.get("actual-size"),
        cluster_size=data.get("cluster-size"),
        backing_file=data.get("backing-filename"),
        backing_format=data.get("backing-filename-format"),
        full_backing_file=data.get("full-backing-filename"),
        dirty=bool(data.get("dirty-flag", False)),
        encrypted=bool(data.get("encrypted", False)),
        corrupt=bool(specific.get("corrupt", False)),
        data_file=specific.get("data-file"),
        extents=tuple(str(extent.get("filename", ""))
                      for extent in specific.get("extents", ())),
    )


def parse_info(document: Any) -> ImageInfo:
    """Parse ``qemu-img info --output=json`` (an object, or a list with --backing-chain)."""
    if isinstance(document, dict):
        return _one_info(document)
    images = [_one_info(item) for item in document]
    return dataclasses.replace(images[0], backing_chain=tuple(images[1:]))


def parse_check(document: dict[str, Any]) -> CheckResult:
    """Parse ``qemu-img check --output=json``."""
    return CheckResult(
        supported=True,
        corruptions=int(document.get("corruptions", 0)),
        leaks=int(document.get("leaks", 0)),
        check_errors=int(document.get("check-errors", 0)),
        image_end_offset=document.get("image-end-offset"),
    )


class ProgressParser:
    """Turns ``qemu-img -p`` output into percentages.

    With stdout not a terminal, qemu-img 7.2 writes ``    (12.00/100%)\\r`` per update (one
    per 1-2 %) and a final ``\\r\\n``; chunks may end anywhere in an update.
    """

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, chunk: bytes) -> float | None:
        """Return the newest complete percentage in ``chunk``, or None if there is none."""
        data = self._partial + chunk
        end = max(data.rfind(b"\r"), data.rfind(b"\n")) + 1
        self._partial = data[end:][-256:]
        found = _PROGRESS.findall(data, 0, end)
        return min(100.0, float(found[-1])) if found else None


class ProgressThrottle:
    """Passes values to ``callback`` at most once per ``interval``; ``flush`` sends the last."""

    def __init__(self, callback: ProgressCallback, interval: float = PROGRESS_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._callback = callback
        self._interval = interval
        self._clock = clock
        self._latest: float | None = None
        self._sent: float | None = None
        self._sent_at = float("-inf")

    def update(self, value: float) -> None:
        self._latest = value
        now = self._clock()
        if now - self._sent_at >= self._interval:
            self._sent_at = now
            self._send()

    def flush(self) -> None:
        if self._latest is not None and self._latest != self._sent:
            self._send()

    def _send(self) -> None:
        self._sent = self._latest
        assert self._sent is not None
        try:
            self._callback(self._sent)
        except Exception:
            # A broken progress consumer must not abort a copy that is going well.
            log.exception("qemu-img progress callback failed")


def _failure(args: Sequence[str], status: int | None, stderr: str) -> QemuImgError:
    message = f"qemu-img {args[0]} exited with status {status}"
    if "No space left on device" in stderr:
        return NoSpace(message, status=status, stderr=stderr)
    if 'Failed to get "write" lock' in stderr or 'Failed to get shared "write" lock' in stderr:
        return ImageInUse(message, status=status, stderr=stderr)
    return QemuImgError(message, status=status, stderr=stderr)


# --- running qemu-img ------------------------------------------------------------------


class _StderrTail:
    def __init__(self) -> None:
        self._data = bytearray()

    def feed(self, chunk: bytes) -> None:
        self._data += chunk
        del self._data[:-STDERR_LIMIT]

    def text(self) -> str:
        lines = self._data.decode(errors="replace").strip().splitlines()
        return "\n".join(lines[-STDERR_LINES:])


async def _drain(stream: asyncio.StreamReader, sink: Callable[[bytes], None]) -> None:
    while chunk := await stream.read(65536):
        sink(chunk)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM the process group, SIGKILL it after the grace period, wait for the exit."""
    if proc.returncode is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(TERM_GRACE):
                await proc.wait()
        except TimeoutError:
            _signal_group(proc.pid, signal.SIGKILL)
            try:
                async with asyncio.timeout(KILL_WAIT):
                    await proc.wait()
            except TimeoutError:
                log.warning("qemu-img pid %d survived SIGKILL (stuck on storage?)", proc.pid)
                return
    # Anything the process left behind in its group goes with it.
    _signal_group(proc.pid, signal.SIGKILL)


async def _run(args: Sequence[str], *, timeout: float | None = None,
               progress: ProgressCallback | None = None,
               accept: Collection[int] = (0,)) -> bytes:
    """Run ``qemu-img ARGS``; return its stdout, or feed it to ``progress`` when given.

    Raises the error that matches stderr unless the exit status is in ``accept``.
    """
    proc = await asyncio.create_subprocess_exec(
        *_PREFIX, QEMU_IMG, *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, start_new_session=True, env=_ENV,
    )
    assert proc.stdout is not None and proc.stderr is not None
    stderr = _StderrTail()
    stdout = bytearray()
    throttle = ProgressThrottle(progress) if progress is not None else None
    parser = ProgressParser()

    def take_stdout(chunk: bytes) -> None:
        if throttle is not None:
            value = parser.feed(chunk)
            if value is not None:
                throttle.update(value)
        elif len(stdout) + len(chunk) <= STDOUT_LIMIT:
            stdout.extend(chunk)

    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(_drain(proc.stdout, take_stdout),
                                 _drain(proc.stderr, stderr.feed))
            status = await proc.wait()
    except TimeoutError:
        await to_the_end(_stop(proc), "qemu-img cleanup")
        raise Timeout(f"qemu-img {args[0]} did not finish within {timeout} s",
                      status=None, stderr=stderr.text()) from None
    except BaseException:
        await to_the_end(_stop(proc), "qemu-img cleanup")
        raise
    if status not in accept:
        raise _failure(args, status, stderr.text())
    if throttle is not None:
        throttle.flush()
    return bytes(stdout)


async def _run_json(args: Sequence[str], timeout: float | None) -> Any:
    return json.loads(await _run(args, timeout=timeout))


def _abs(path: PathLike) -> str:
    # Absolute: never an option ("-x") or a protocol ("nbd:x", "json:{...}") to qemu-img.
    return os.path.abspath(os.fspath(path))


def _image(image: PathLike | Chain, fmt: str | None, *,
           probe: bool = False) -> tuple[list[str], str]:
    """The options and the filename that name ``image`` to qemu-img. A path needs its
    format unless ``probe`` (qemu-img then guesses it)."""
    if isinstance(image, Chain):
        if fmt is not None:
            raise ValueError("a chain states the format of each image; pass no format")
        return [], image.filename()
    if fmt is None and not probe:
        raise ValueError(f"{_abs(image)} needs its format")
    return (["-f", fmt] if fmt is not None else []), _abs(image)


async def _exists(path: str) -> bool:
    # stat() on shared storage can block; keep it off the loop.
    return await asyncio.to_thread(os.path.lexists, path)


async def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        await asyncio.to_thread(os.unlink, path)


async def _new_target(path: str, run: Coroutine[Any, Any, Any]) -> None:
    """Run ``run``, which creates ``path``; remove ``path`` if it fails or is cancelled."""
    if await _exists(path):
        run.close()
        raise FileExistsError(f"{path} exists")
    try:
        await run
    except BaseException:
        await to_the_end(_remove(path), "qemu-img cleanup")
        raise


def _shown(image: PathLike | Chain) -> str:
    return image.layers[0][0] if isinstance(image, Chain) else _abs(image)


def _check_preallocation(preallocation: str | None) -> list[str]:
    if preallocation is None:
        return []
    if preallocation not in PREALLOCATION:
        raise ValueError(f"preallocation must be one of {PREALLOCATION}, not {preallocation!r}")
    return ["-o", f"preallocation={preallocation}"]


def _check_backing(backing: str | None, backing_fmt: str | None) -> list[str]:
    if backing is None:
        return []
    if backing_fmt is None:
        raise ValueError("a backing file needs its format (backing_fmt)")
    head = backing.split("/", 1)[0]
    if ":" in head:
        # qemu-img would read "x:..." as a protocol; the volume layer never names files so.
        raise ValueError(f"backing file {backing!r} looks like a protocol")
    return ["-b", backing, "-F", backing_fmt]


# --- the calls ---------------------------------------------------------------------------


async def info(path: PathLike | Chain, *, fmt: str | None = None, backing_chain: bool = True,
               timeout: float = METADATA_TIMEOUT) -> ImageInfo:
    """Describe an image (and with ``backing_chain`` every image below it).

    Opens the image shared (``-U``), so an image a VM is using can be read. Pass ``fmt``
    with a path whenever it is known: probing lets a guest that writes a qcow2 header into
    a raw disk choose the format. A :class:`Chain` states the formats, and its images are
    described one by one (qemu-img's ``--backing-chain`` follows the names in the headers).
    Raises QemuImgError (Timeout after ``timeout`` seconds; each call for a chain).
    """
    if isinstance(path, Chain):
        _image(path, fmt)  # refuses a format with a chain
        # qemu-img info never opens a backing file (it refuses backing options), and its
        # --backing-chain opens each image below by the name in the header of the one
        # above: each image of a chain is described alone, with no backing.
        found = [parse_info(await _run_json(
                    ["info", "--output=json", "-U", Chain((layer,)).filename()], timeout))
                 for layer in (path.layers if backing_chain else path.layers[:1])]
        return dataclasses.replace(found[0], backing_chain=tuple(found[1:]))
    options, filename = _image(path, fmt, probe=True)
    args = ["info", "--output=json", "-U", *options]
    if backing_chain:
        args.append("--backing-chain")
    return parse_info(await _run_json([*args, filename], timeout))


async def create(path: PathLike, fmt: str, size: int | None, *, backing: str | None = None,
                 backing_fmt: str | None = None, preallocation: str | None = None,
                 timeout: float | None = None) -> None:
    """Create an image of ``size`` bytes (None: the size of ``backing``).

    ``backing`` is written into the image as given (relative to the image's folder unless
    absolute). With a ``size`` the backing file is not opened (``-u``): whatever its own
    header names is not followed. Raises FileExistsError if ``path`` exists, ValueError
    for bad arguments, NoSpace or QemuImgError; a partly created file is removed.
    """
    target = _abs(path)
    args = ["create", "-q", "-f", fmt, *_check_backing(backing, backing_fmt),
            *_check_preallocation(preallocation)]
    if backing is not None and size is not None:
        args.append("-u")
    args.append(target)
    if size is not None:
        args.append(str(size))
    elif backing is None:
        raise ValueError("an image without a backing file needs a size")
    await _new_target(target, _run(args, timeout=timeout))


async def resize(path: PathLike | Chain, size: int, fmt: str | None = None, *,
                 preallocation: str | None = None, timeout: float | None = None) -> None:
    """Grow an image's virtual size to ``size`` bytes; the same size is a no-op.

    ``fmt`` goes with a path; a :class:`Chain` states it (its backing matters: growing a
    layer over a longer backing image zeroes the new part). Raises ShrinkRefused (before
    running anything) for a smaller size, ImageInUse when a VM has it open, NoSpace or
    QemuImgError.
    """
    options, filename = _image(path, fmt)
    image = path if isinstance(path, Chain) else filename
    current = (await info(image, fmt=fmt, backing_chain=False)).virtual_size
    if size < current:
        raise ShrinkRefused(f"{_shown(path)} is {current} bytes; shrinking to {size} is "
                            "refused")
    if size == current:
        return
    args = ["resize", "-q", *options]
    if preallocation is not None:
        _check_preallocation(preallocation)
        args.append(f"--preallocation={preallocation}")
    await _run([*args, filename, str(size)], timeout=timeout)


async def measure(dst_fmt: str, *, src: PathLike | Chain | None = None,
                  src_fmt: str | None = None,
                  size: int | None = None, preallocation: str | None = None,
                  timeout: float = METADATA_TIMEOUT) -> Measurement:
    """Bytes a ``dst_fmt`` image needs: a copy of ``src`` (converted), or a new one of ``size``.

    Exactly one of ``src`` and ``size`` is given. ``src`` is opened shared (``-U``).
    """
    if (src is None) == (size is None):
        raise ValueError("measure() takes either src or size")
    args = ["measure", "--output=json", "-O", dst_fmt, *_check_preallocation(preallocation)]
    if src is not None:
        options, filename = _image(src, src_fmt, probe=True)
        args += [*options, "-U", filename]
    else:
        args += ["--size", str(size)]
    document = await _run_json(args, timeout)
    return Measurement(int(document["required"]), int(document["fully-allocated"]))


async def check(path: PathLike | Chain, fmt: str | None = None, *, force_share: bool = False,
                timeout: float | None = None) -> CheckResult:
    """Check an image's metadata (read-only, nothing is repaired).

    Exit statuses 2 (corruptions) and 3 (leaks) are results, not errors; formats without
    checks give ``supported=False``. ``force_share`` reads an image in use, whose metadata
    may be changing. Raises QemuImgError when the check could not run.
    """
    options, filename = _image(path, fmt)
    args = ["check", "--output=json", *options, *(["-U"] if force_share else []), filename]
    try:
        output = await _run(args, timeout=timeout, accept=(0, 2, 3))
    except QemuImgError as error:
        if error.status == 63:
            return CheckResult(supported=False)
        raise
    return parse_check(json.loads(output))


async def convert(src: PathLike | Chain, dst: PathLike, *, src_fmt: str | None = None,
                  dst_fmt: str,
                  preallocation: str | None = None, sparse: bool = True,
                  backing: str | None = None, backing_fmt: str | None = None,
                  target_exists: bool = False, force_share: bool = False,
                  subformat: str | None = None,
                  progress: ProgressCallback | None = None,
                  timeout: float | None = None) -> None:
    """Copy ``src`` into ``dst`` in ``dst_fmt``, calling ``progress(percent)`` as it goes.

    ``src_fmt`` goes with a path; a :class:`Chain` is copied as what it shows, all its
    images flattened.

    ``subformat`` is a vmdk's (``streamOptimized``: compressed, for OVAs).
    ``sparse=False`` writes zeros too (``-S 0``). With ``backing`` the target is a layer
    over it and only what differs from it is copied. ``target_exists`` writes into an
    image the caller has made (``-n``) and leaves it in place on failure; otherwise
    ``dst`` must not exist and is removed if the copy fails or is cancelled. Raises
    FileExistsError, NoSpace, ImageInUse, QemuImgError.
    """
    if target_exists and preallocation is not None:
        raise ValueError("preallocation is chosen when the target is made, not with target_exists")
    target = _abs(dst)
    src_options, src_name = _image(src, src_fmt)
    args = ["convert", "-p", *src_options, "-O", dst_fmt, *_check_preallocation(preallocation)]
    args += _check_backing(backing, backing_fmt)
    if not sparse:
        args += ["-S", "0"]
    if target_exists:
        args.append("-n")
    if force_share:
        args.append("-U")
    if subformat is not None:
        if dst_fmt != "vmdk" or subformat not in VMDK_SUBFORMATS:
            raise ValueError(f"subformat {subformat!r} is not one of a vmdk's")
        args += ["-o", f"subformat={subformat}"]
    run = _run([*args, src_name, target], timeout=timeout, progress=progress)
    if target_exists:
        await run
    else:
        await _new_target(target, run)


async def rebase_header(path: PathLike, fmt: str, backing: str, backing_fmt: str, *,
                        timeout: float | None = None) -> None:
    """Name another backing file in ``path``'s header (``rebase -u``): no data is read or
    written, so the new backing file must show what the old one did. ``backing`` is
    written as given (relative to the image's folder unless absolute)."""
    await _run(["rebase", "-u", "-f", fmt, *_check_backing(backing, backing_fmt),
                _abs(path)], timeout=timeout)


async def commit(top: PathLike | Chain, *, top_fmt: str | None = None,
                 base: PathLike | None = None, progress: ProgressCallback | None = None,
                 timeout: float | None = None) -> None:
    """Write the data of ``top`` into ``base`` (its backing file when None).

    A :class:`Chain` (of two images at least, and no ``base``) is committed into its
    second image. ``top`` is left as it was (``-d``); the images between ``top`` and
    ``base`` are committed too. A cancelled or failed commit leaves ``base`` partly
    written, and so every image that uses it inconsistent: mark them illegal before
    calling this, and legal again only after it succeeds. Raises NoSpace, ImageInUse,
    QemuImgError.
    """
    if isinstance(top, Chain) and (base is not None or len(top.layers) < 2):
        raise ValueError("a chain is committed into its second image, and needs one")
    options, filename = _image(top, top_fmt)
    args = ["commit", "-p", "-d", *options]
    if base is not None:
        args += ["-b", _abs(base)]
    await _run([*args, filename], timeout=timeout, progress=progress)
