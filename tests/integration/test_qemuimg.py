"""storage.qemuimg against the real qemu-img, on files in tmp_path (and a full loop mount)."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import psutil
import pytest

from tests.conftest import missing
from tests.integration.conftest import LoopFsFactory, qemu_io, qemu_io_command
from tests.subproc import run
from virtnode.storage.images import qemuimg

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def qemu_img() -> None:
    if shutil.which("qemu-img") is None:
        missing("qemu-img is not installed (tools/ensure-host installs qemu-utils)")


async def write_pattern(image: Path, fmt: str, pattern: int, offset: int, length: int) -> None:
    await qemu_io(image, fmt, f"write -P {pattern:#x} {offset} {length}")


def fill_with_data(path: Path, size: int) -> None:
    """A raw image of incompressible, non-zero data (nothing for convert to skip)."""
    block = os.urandom(MiB)
    with path.open("wb") as out:
        for _ in range(size // MiB):
            out.write(block)


@pytest.fixture(scope="module")
def big_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """512 MiB of real data: a convert of it runs for about a second."""
    path = tmp_path_factory.mktemp("big") / "big.raw"
    fill_with_data(path, 512 * MiB)
    return path


async def test_create_and_info_of_raw_and_qcow2(tmp_path: Path) -> None:
    await qemuimg.create(tmp_path / "a.raw", "raw", 10 * MiB)
    await qemuimg.create(tmp_path / "a.qcow2", "qcow2", 20 * MiB)
    raw = await qemuimg.info(tmp_path / "a.raw", fmt="raw")
    qcow2 = await qemuimg.info(tmp_path / "a.qcow2", fmt="qcow2")
    assert (raw.format, raw.virtual_size, raw.backing_file) == ("raw", 10 * MiB, None)
    assert (qcow2.format, qcow2.virtual_size, qcow2.cluster_size) == ("qcow2", 20 * MiB, 65536)
    assert not qcow2.dirty and not qcow2.encrypted and not qcow2.corrupt
    assert qcow2.actual_size is not None and qcow2.actual_size < MiB
    assert qcow2.filename == str(tmp_path / "a.qcow2")


async def test_create_refuses_an_existing_path_and_keeps_it(tmp_path: Path) -> None:
    await qemuimg.create(tmp_path / "a.raw", "raw", MiB)
    with pytest.raises(FileExistsError):
        await qemuimg.create(tmp_path / "a.raw", "raw", 2 * MiB)
    assert (await qemuimg.info(tmp_path / "a.raw", fmt="raw")).virtual_size == MiB


async def test_preallocated_raw_is_allocated(tmp_path: Path) -> None:
    await qemuimg.create(tmp_path / "full.raw", "raw", 8 * MiB, preallocation="full")
    assert (await qemuimg.info(tmp_path / "full.raw", fmt="raw")).actual_size == 8 * MiB
    with pytest.raises(ValueError, match="preallocation"):
        await qemuimg.create(tmp_path / "x.raw", "raw", MiB, preallocation="thick")


async def test_qcow2_over_a_backing_file_shows_the_chain(tmp_path: Path) -> None:
    await qemuimg.create(tmp_path / "base.raw", "raw", 4 * MiB)
    await qemuimg.create(tmp_path / "mid.qcow2", "qcow2", None,
                         backing="base.raw", backing_fmt="raw")
    await qemuimg.create(tmp_path / "top.qcow2", "qcow2", None,
                         backing="mid.qcow2", backing_fmt="qcow2")
    top = await qemuimg.info(tmp_path / "top.qcow2", fmt="qcow2")
    assert (top.backing_file, top.backing_format) == ("mid.qcow2", "qcow2")
    assert top.full_backing_file == str(tmp_path / "mid.qcow2")
    assert top.virtual_size == 4 * MiB
    assert [(i.filename, i.format) for i in top.backing_chain] == [
        (str(tmp_path / "mid.qcow2"), "qcow2"), (str(tmp_path / "base.raw"), "raw")]
    alone = await qemuimg.info(tmp_path / "top.qcow2", fmt="qcow2", backing_chain=False)
    assert alone.backing_chain == ()
    with pytest.raises(ValueError, match="format"):
        await qemuimg.create(tmp_path / "x.qcow2", "qcow2", None, backing="base.raw")


async def test_resize_grows_and_refuses_to_shrink(tmp_path: Path) -> None:
    for fmt in ("raw", "qcow2"):
        image = tmp_path / f"r.{fmt}"
        await qemuimg.create(image, fmt, 4 * MiB)
        await qemuimg.resize(image, 8 * MiB, fmt)
        await qemuimg.resize(image, 8 * MiB, fmt)
        with pytest.raises(qemuimg.ShrinkRefused):
            await qemuimg.resize(image, 2 * MiB, fmt)
        assert (await qemuimg.info(image, fmt=fmt)).virtual_size == 8 * MiB


async def test_measure_a_copy_and_a_new_image(tmp_path: Path) -> None:
    src = tmp_path / "data.raw"
    await qemuimg.create(src, "raw", 64 * MiB)
    await write_pattern(src, "raw", 0xAB, 0, 8 * MiB)
    copy = await qemuimg.measure("qcow2", src=src, src_fmt="raw")
    assert 8 * MiB < copy.required < 9 * MiB
    assert copy.fully_allocated > 64 * MiB
    new = await qemuimg.measure("raw", size=16 * MiB)
    assert (new.required, new.fully_allocated) == (16 * MiB, 16 * MiB)
    with pytest.raises(ValueError):
        await qemuimg.measure("qcow2")


async def test_check(tmp_path: Path) -> None:
    await qemuimg.create(tmp_path / "c.qcow2", "qcow2", MiB)
    await qemuimg.create(tmp_path / "c.raw", "raw", MiB)
    result = await qemuimg.check(tmp_path / "c.qcow2", "qcow2")
    assert result.supported and result.clean
    assert not (await qemuimg.check(tmp_path / "c.raw", "raw")).supported
    with pytest.raises(qemuimg.QemuImgError) as failed:
        await qemuimg.check(tmp_path / "c.raw", "qcow2")
    assert failed.value.status == 1
    assert "qcow2" in failed.value.stderr


async def test_convert_raw_to_qcow2_reports_progress_up_to_100(
        tmp_path: Path, big_raw: Path) -> None:
    seen: list[float] = []
    dst = tmp_path / "copy.qcow2"
    await qemuimg.convert(big_raw, dst, src_fmt="raw", dst_fmt="qcow2", progress=seen.append)
    assert seen[-1] == 100.0
    assert seen == sorted(seen)
    copy = await qemuimg.info(dst, fmt="qcow2")
    assert copy.virtual_size == 512 * MiB
    assert copy.actual_size is not None and copy.actual_size >= 512 * MiB
    (await run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", big_raw, dst)).check()


async def test_commit_writes_the_layer_into_its_base(tmp_path: Path) -> None:
    base, top = tmp_path / "base.raw", tmp_path / "top.qcow2"
    await qemuimg.create(base, "raw", 4 * MiB)
    await qemuimg.create(top, "qcow2", None, backing="base.raw", backing_fmt="raw")
    await write_pattern(top, "qcow2", 0xAB, 0, MiB)
    seen: list[float] = []
    await qemuimg.commit(top, top_fmt="qcow2", base=base, progress=seen.append)
    assert seen[-1] == 100.0
    data = await asyncio.to_thread(base.read_bytes)
    assert data[:MiB] == b"\xab" * MiB
    assert data[MiB:] == bytes(3 * MiB)


async def test_a_chain_is_opened_as_stated_whatever_the_headers_name(tmp_path: Path) -> None:
    """Every call given a Chain reads the images it names and no file a header names."""
    secret = b"outside-the-chain" * 64
    outside = tmp_path / "outside.raw"
    await asyncio.to_thread(outside.write_bytes, secret + bytes(4 * MiB - len(secret)))
    base, top = tmp_path / "base.raw", tmp_path / "top.qcow2"
    await qemuimg.create(base, "raw", 4 * MiB)
    await write_pattern(base, "raw", 0x11, 0, 4 * MiB)
    # The header names the outside file; the chain says base.raw, or nothing at all.
    (await run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(outside),
               "-F", "raw", top, str(4 * MiB))).check()
    await write_pattern(top, "qcow2", 0x22, 0, MiB)
    alone = qemuimg.Chain.of((top, "qcow2"))
    layered = qemuimg.Chain.of((top, "qcow2"), (base, "raw"))

    assert (await qemuimg.info(alone)).backing_chain == ()
    assert [i.filename for i in (await qemuimg.info(layered)).backing_chain] == [str(base)]
    assert (await qemuimg.check(alone)).clean
    assert (await qemuimg.measure("raw", src=alone)).required == 4 * MiB
    await qemuimg.convert(alone, tmp_path / "alone.raw", dst_fmt="raw")
    await qemuimg.convert(layered, tmp_path / "layered.raw", dst_fmt="raw")
    data = await asyncio.to_thread((tmp_path / "alone.raw").read_bytes)
    assert data == b"\x22" * MiB + bytes(3 * MiB)
    data = await asyncio.to_thread((tmp_path / "layered.raw").read_bytes)
    assert data == b"\x22" * MiB + b"\x11" * (3 * MiB)

    await qemuimg.resize(layered, 8 * MiB)
    assert (await qemuimg.info(alone)).virtual_size == 8 * MiB
    await qemuimg.commit(layered)  # into base.raw, grown to the layer's new size
    data = await asyncio.to_thread(base.read_bytes)
    assert data == b"\x22" * MiB + b"\x11" * (3 * MiB) + bytes(4 * MiB)
    content = await asyncio.to_thread(outside.read_bytes)
    assert content.startswith(secret) and len(content) == 4 * MiB
    with pytest.raises(ValueError):
        await qemuimg.commit(alone)
    with pytest.raises(ValueError):
        await qemuimg.info(alone, fmt="qcow2")


async def test_create_over_a_backing_file_does_not_open_it(tmp_path: Path) -> None:
    """With a size, the new layer's backing file is only named (its header may lie)."""
    await qemuimg.create(tmp_path / "top.qcow2", "qcow2", MiB, backing="absent.qcow2",
                         backing_fmt="qcow2")
    info = await qemuimg.info(tmp_path / "top.qcow2", fmt="qcow2", backing_chain=False)
    assert info.backing_file == "absent.qcow2"


async def qemu_img_children() -> list[psutil.Process]:
    me = psutil.Process()
    return [p for p in me.children(recursive=True) if p.name() == "qemu-img"]


async def test_cancelled_convert_kills_qemu_img_and_removes_the_target(
        tmp_path: Path, big_raw: Path) -> None:
    dst = tmp_path / "copy.qcow2"
    started = asyncio.Event()
    task = asyncio.create_task(qemuimg.convert(
        big_raw, dst, src_fmt="raw", dst_fmt="qcow2", progress=lambda _: started.set()))
    async with asyncio.timeout(30):
        await started.wait()
    (child,) = await qemu_img_children()
    assert child.pid != os.getpgid(0) and os.getpgid(child.pid) == child.pid
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not psutil.pid_exists(child.pid)
    assert not dst.exists()


async def test_convert_timeout_kills_and_removes_the_target(
        tmp_path: Path, big_raw: Path) -> None:
    dst = tmp_path / "copy.qcow2"
    with pytest.raises(qemuimg.Timeout):
        await qemuimg.convert(big_raw, dst, src_fmt="raw", dst_fmt="qcow2", timeout=0.1)
    assert not dst.exists()
    assert await qemu_img_children() == []


async def test_failed_convert_keeps_a_target_it_did_not_create(tmp_path: Path) -> None:
    dst = tmp_path / "made.qcow2"
    await qemuimg.create(dst, "qcow2", MiB)
    with pytest.raises(qemuimg.QemuImgError) as failed:
        await qemuimg.convert(tmp_path / "absent.raw", dst, src_fmt="raw", dst_fmt="qcow2",
                              target_exists=True)
    assert "absent.raw" in failed.value.stderr
    assert dst.exists()


async def test_full_filesystem_is_no_space_and_leaves_no_partial_file(
        loop_fs: LoopFsFactory, tmp_path: Path) -> None:
    tiny_fs = tmp_path / "mnt"
    await loop_fs(16 * MiB, mount=tiny_fs)
    src = tmp_path / "data.raw"
    await asyncio.to_thread(fill_with_data, src, 64 * MiB)
    with pytest.raises(qemuimg.NoSpace) as failed:
        await qemuimg.convert(src, tiny_fs / "copy.qcow2", src_fmt="raw", dst_fmt="qcow2")
    assert "No space left on device" in failed.value.stderr
    assert not (tiny_fs / "copy.qcow2").exists()
    with pytest.raises(qemuimg.NoSpace):
        await qemuimg.create(tiny_fs / "big.raw", "raw", 64 * MiB, preallocation="full")
    assert await asyncio.to_thread(os.listdir, tiny_fs) == ["lost+found"]


async def test_names_with_spaces_dashes_and_colons_are_only_file_names(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    await qemuimg.create("-f raw.img", "raw", MiB)
    await write_pattern(tmp_path / "-f raw.img", "raw", 0x5A, 0, MiB)
    await qemuimg.convert("-f raw.img", "nbd:localhost:1", src_fmt="raw", dst_fmt="qcow2")
    copy = await qemuimg.info("nbd:localhost:1", fmt="qcow2")
    assert copy.filename == str(tmp_path / "nbd:localhost:1")
    assert sorted(os.listdir(tmp_path)) == ["-f raw.img", "nbd:localhost:1"]
    with pytest.raises(ValueError, match="protocol"):
        await qemuimg.create("top.qcow2", "qcow2", None, backing="nbd:localhost:1",
                             backing_fmt="qcow2")



async def test_an_image_open_for_writing_elsewhere_is_in_use(tmp_path: Path) -> None:
    image = tmp_path / "busy.qcow2"
    await qemuimg.create(image, "qcow2", MiB)
    # qemu-io holds the image's write lock from its open to its exit; the line its write
    # prints (line-buffered through stdbuf) says the image is open.
    holder = await asyncio.create_subprocess_exec(
        "stdbuf", "-oL", qemu_io_command(), "-f", "qcow2", "-c", "write 0 512", "-c", "sleep 60000",
        image, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    assert holder.stdout is not None
    try:
        async with asyncio.timeout(10):
            assert (await holder.stdout.readline()).startswith(b"wrote 512/512")
        with pytest.raises(qemuimg.ImageInUse):
            await qemuimg.resize(image, 2 * MiB, "qcow2")
        assert (await qemuimg.info(image, fmt="qcow2")).virtual_size == MiB
    finally:
        holder.kill()
        await holder.wait()
