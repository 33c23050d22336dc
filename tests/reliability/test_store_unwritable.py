"""Issue 9: the embedding store cannot be written (full disk; read-only folder, simulated: chmod does not stop root).
The extraction stops with exit 2 and a message naming the store folder, the cause and the fix; the entries
stored before (earlier runs' and this run's) stay byte-identical, no temporary file is left, and the rerun completes
to the store an uninterrupted extraction writes."""
import errno
from pathlib import Path

from reliability_helpers import EXTRACT_ARGS, assert_unchanged, extract_output, private_dataset, snapshot, store_root


def test_a_full_disk_stops_the_extraction_by_name_and_loses_nothing(referring_dataset, tmp_path, monkeypatch, capsys):
    from nnunet_textguided.conditioning import store as store_module
    _, pre = private_dataset(referring_dataset, tmp_path, monkeypatch)
    rc, _, err = extract_output(EXTRACT_ARGS, capsys)
    assert rc == 0, err
    clean = snapshot(pre)
    (folder,) = store_root(pre).iterdir()
    cases = sorted(p.stem for p in folder.glob("referring_*.npy"))
    for case in cases[-6:]:  # an earlier extraction stopped after 10 of the 16 cases
        for ext in (".npy", ".json"):
            (folder / f"{case}{ext}").unlink()
    earlier = snapshot(pre)

    real, written = store_module.atomic_write_bytes, []

    def disk_fills_up(path, data):
        """The 3rd entry of this run: half its bytes reach the temporary file, then the disk is full."""
        if len(written) == 2:
            def half(f):
                f.write(data[:len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, half)
        written.append(Path(path).stem)
        return real(path, data)
    monkeypatch.setattr(store_module, "atomic_write_bytes", disk_fills_up)
    rc, out, err = extract_output(EXTRACT_ARGS, capsys)
    assert rc == 2, out + err
    assert (f"nnUNetv2_extract_textguided: error: cannot write the embedding store {folder}: [Errno 28] No space left "
            "on device; free disk space or make the folder writable (entries stored so far are unchanged)") in err
    after = assert_unchanged(earlier, pre)
    assert written == cases[-6:-4]  # this run's two entries before the failure: complete and exact
    entries = {k: v for k, v in clean.items() if Path(k).parent == folder.relative_to(pre) and Path(k).stem in written}
    assert {k: v for k, v in after.items() if k not in earlier} == entries
    assert not list(folder.glob(".*.tmp"))

    monkeypatch.setattr(store_module, "atomic_write_bytes", real)
    rc, out, err = extract_output(EXTRACT_ARGS, capsys)
    assert rc == 0, err
    assert "embeddings computed: 4, already current: 12" in out
    assert snapshot(pre) == clean


def test_a_read_only_store_stops_the_extraction_by_name_and_changes_nothing(referring_dataset, tmp_path, monkeypatch,
                                                                           capsys):
    """Running as root, chmod cannot make a folder read-only: every write fails the way a read-only mount does."""
    from nnunet_textguided.conditioning import store as store_module
    _, pre = private_dataset(referring_dataset, tmp_path, monkeypatch)
    rc, _, err = extract_output(EXTRACT_ARGS, capsys)
    assert rc == 0, err
    (folder,) = store_root(pre).iterdir()
    for ext in (".npy", ".json"):
        (folder / f"referring_003{ext}").unlink()  # one entry to compute
    before = snapshot(pre)

    def read_only(path, data):
        raise OSError(errno.EROFS, "Read-only file system", str(path))
    monkeypatch.setattr(store_module, "atomic_write_bytes", read_only)
    rc, out, err = extract_output(EXTRACT_ARGS, capsys)
    assert rc == 2, out + err
    assert f"nnUNetv2_extract_textguided: error: cannot write the embedding store {folder}: [Errno 30] Read-only " \
           "file system" in err and "make the folder writable (entries stored so far are unchanged)" in err
    assert snapshot(pre) == before
